"""Where the model's pieces live in the pipeline: stages, their layers, which ranks hold which parameter.

One :class:`PipelineLayout` answers every placement question, for the executor, the construction path
(:func:`hai.parallel.parallelize`), the checkpoint and the planner alike:

- ``num_stages``: ``pp`` stages (``2*pp`` for DualPipeV), each a contiguous run of transformer layers
  (:func:`stage_layer_split`: as even as possible, the outer stages, which also hold the embedding and the
  head/MTP, take the smaller share);
- ``rank_stages(rank)``: the stages a pipeline rank runs (DualPipe: stages ``r`` and ``pp-1-r``, so every stage
  exists on two ranks; DualPipeV: stages ``r`` and ``2*pp-1-r``);
- ``stage_modules(stage)``: the top-level modules a stage uses: stage 0 the embedding, the last stage the final
  norm, the head, the MTP modules and, with MTP, the embedding too (MTP re-embeds the shifted tokens, so V3's
  placement keeps one embedding on the ranks of the first and of the last stage);
- ``holders(name)``: the pipeline ranks holding a parameter (two for DualPipe's copies and for an embedding shared
  by the first and last stage); their gradients are summed before the optimizer step.

Pure functions of the config: nothing here needs a process group, so ``hai plan`` and the validation before launch
use the same placement as the run. Schedule names and their argument checks live here too (``check_schedule``), so
the topology validates a layout without importing the pipeline runtime.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from hai.config import ConfigError, ModelConfig

__all__ = ["SCHEDULE_NAMES", "PipelineLayout", "StageSpec", "parse_layout", "default_layout", "layout_text",
           "stage_layer_split", "stage_layers", "num_stages", "rank_stages", "param_copies", "check_schedule",
           "module_of"]

SCHEDULE_NAMES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def _check_name(name: str) -> None:
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"parallel.schedule={name!r} is not one of {list(SCHEDULE_NAMES)}: pick one of them")


def check_schedule(name: str, pp: int, n_micro: int, rank: int = 0) -> None:
    """The argument rules of every schedule (ValueError naming the value and the fix)."""
    _check_name(name)
    if pp < 2:
        raise ValueError(f"schedule {name} needs parallel.pp >= 2, got pp={pp}: with one stage there is no "
                         f"pipeline, set parallel.pp >= 2")
    if not 0 <= rank < pp:
        raise ValueError(f"rank={rank} is outside the pipeline of pp={pp}: pass 0 <= rank < {pp}")
    if n_micro < 1:
        raise ValueError(f"parallel.micro_batches={n_micro} must be >= 1")
    if name not in ("dualpipe", "dualpipev"):
        return
    if name == "dualpipe" and pp % 2:
        raise ValueError(f"{name} needs an even parallel.pp (rank r pairs with rank pp-1-r), got pp={pp}: "
                         f"use pp={pp + 1} or pp={pp - 1}, or schedule=dualpipev")
    if name == "dualpipe" and n_micro % 2:
        raise ValueError(f"{name} needs an even parallel.micro_batches (half enter from each end), got "
                         f"micro_batches={n_micro}: use {n_micro + 1}")
    if n_micro < 2 * pp:
        raise ValueError(f"{name} needs parallel.micro_batches >= 2*pp = {2 * pp}, got micro_batches={n_micro}: "
                         f"set parallel.micro_batches={2 * pp} or more")


def num_stages(name: str, pp: int) -> int:
    """Model stages (chunks of layers) the schedule splits the model into on ``pp`` ranks."""
    _check_name(name)
    return 2 * pp if name == "dualpipev" else pp


def rank_stages(name: str, pp: int, rank: int) -> tuple[int, ...]:
    """The stages a rank holds, in local chunk order (chunk 0 first)."""
    _check_name(name)
    if name == "dualpipe":
        return (rank, pp - 1 - rank)
    if name == "dualpipev":
        return (rank, 2 * pp - 1 - rank)
    return (rank,)


def param_copies(name: str) -> int:
    """How many copies of each stage's parameters the pipeline holds (DualPipe duplicates every stage)."""
    _check_name(name)
    return 2 if name == "dualpipe" else 1


def stage_layer_split(num_layers: int, n_stages: int) -> list[int]:
    """Layers per pipeline stage, as even as possible, the extra layers to the inner stages first.

    The first and last stages also carry the embedding and the head/MTP, so when the split is uneven the *first and
    last* stages get the smaller share (V3's 61 layers on 16 stages: 3, 4 x 14, 3 plus embedding/head/MTP).
    """
    if num_layers < n_stages:
        raise ConfigError(f"pp={n_stages} needs at least one layer per stage but the model has num_layers="
                          f"{num_layers}: lower parallel.pp to <= {num_layers}")
    base, extra = divmod(num_layers, n_stages)
    counts = [base] * n_stages
    order = list(range(1, n_stages - 1)) + [0, n_stages - 1] if n_stages > 2 else list(range(n_stages))
    for s in order[:extra]:
        counts[s] += 1
    return counts


def stage_layers(num_layers: int, n_stages: int) -> list[range]:
    """The transformer layers of every stage (``stage_layer_split`` as ranges)."""
    bounds, start = [], 0
    for n in stage_layer_split(num_layers, n_stages):
        bounds.append(range(start, start + n))
        start += n
    return bounds


def module_of(name: str) -> str:
    """The top-level placement unit of a parameter or buffer name: ``layers.<i>``, ``embed``, ``norm``, ``head``,
    ``mtp``."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage runs: the embedding (E), transformer layers ``layers``, the final norm + head + main
    loss (L), the MTP modules and their loss (m)."""

    embed: bool
    layers: range
    head: bool
    mtp: bool

    def text(self) -> str:
        n = len(self.layers)
        return ("E" if self.embed else "") + ("" if not n else "t" if n == 1 else f"t*{n}") + \
            ("L" if self.head else "") + ("m" if self.mtp else "")


_ITEM = re.compile(r"E|L|m|t(?:\*(\d+))?")


def parse_layout(text: str, num_layers: int, mtp_depth: int, n_stages: int) -> tuple[StageSpec, ...]:
    """``parallel.layout`` (Megatron-style): stages separated by ``|``, each a run of ``E`` (embedding), ``t`` or
    ``t*N`` (transformer layers), ``L`` (final norm, head and main loss), ``m`` (the MTP modules). E.g. for 61 layers
    on 16 stages ``Et*2|t*4|...|t*3Lm``. Raises ValueError naming the stage and the fix."""
    stages = text.replace(" ", "").split("|")
    if len(stages) != n_stages:
        raise ValueError(f"parallel.layout={text!r} has {len(stages)} stage(s) but the schedule runs {n_stages}: "
                         f"give exactly {n_stages} stages separated by '|'")
    specs, layer = [], 0
    seen_head = seen_mtp = False
    for s, part in enumerate(stages):
        items = [(m.group(0)[0], int(m.group(1) or 1)) for m in _ITEM.finditer(part)]
        if "".join(m.group(0) for m in _ITEM.finditer(part)) != part or not part:
            raise ValueError(f"parallel.layout stage {s} is {part!r}: write it with E, t, t*N, L, m (e.g. 't*4' or "
                             f"'Et*3'); every stage holds at least one of them")
        kinds = [k for k, _ in items]
        embed = "E" in kinds
        if embed and (s != 0 or kinds[0] != "E"):
            raise ValueError(f"parallel.layout stage {s} ({part!r}): the embedding E must open stage 0")
        n = sum(c for k, c in items if k == "t")
        if n and (seen_head or "L" in kinds and kinds.index("L") < max(i for i, k in enumerate(kinds) if k == "t")):
            raise ValueError(f"parallel.layout stage {s} ({part!r}): transformer layers after L: the final norm and "
                             f"head follow the last layer")
        head, mtp = "L" in kinds, "m" in kinds
        if (head and seen_head) or (mtp and seen_mtp) or kinds.count("L") > 1 or kinds.count("m") > 1:
            raise ValueError(f"parallel.layout stage {s} ({part!r}): L and m each appear once in the whole layout")
        if mtp and not (seen_head or head and kinds.index("L") < kinds.index("m")):
            raise ValueError(f"parallel.layout stage {s} ({part!r}): m (MTP) needs the main model's final state: put "
                             f"it after L")
        specs.append(StageSpec(embed, range(layer, layer + n), head, mtp))
        layer += n
        seen_head, seen_mtp = seen_head or head, seen_mtp or mtp
    if not specs[0].embed:
        raise ValueError(f"parallel.layout={text!r}: stage 0 must start with E (the embedding)")
    if layer != num_layers:
        raise ValueError(f"parallel.layout={text!r} places {layer} transformer layers but the model has "
                         f"model.num_layers={num_layers}: the t counts must add up to {num_layers}")
    if not seen_head:
        raise ValueError(f"parallel.layout={text!r} has no L: put the final norm / head / loss (L) on a stage after "
                         f"the last layer")
    if seen_mtp != (mtp_depth > 0):
        raise ValueError(f"parallel.layout={text!r} {'has' if seen_mtp else 'lacks'} m but model.mtp_depth="
                         f"{mtp_depth}: " + ("add m after L" if mtp_depth else "drop m"))
    if not (specs[-1].head or specs[-1].mtp):
        raise ValueError(f"parallel.layout={text!r}: the last stage must compute a loss (end it with L or m)")
    return tuple(specs)


def default_layout(num_layers: int, mtp_depth: int, n_stages: int) -> tuple[StageSpec, ...]:
    """The even split (:func:`stage_layers`), embedding on the first stage, head and MTP on the last."""
    ranges = stage_layers(num_layers, n_stages)
    last = n_stages - 1
    return tuple(StageSpec(s == 0, r, s == last, s == last and mtp_depth > 0) for s, r in enumerate(ranges))


def layout_text(specs: tuple[StageSpec, ...]) -> str:
    return "|".join(sp.text() for sp in specs)


@dataclass(frozen=True)
class PipelineLayout:
    schedule: str
    pp: int
    num_layers: int
    mtp_depth: int
    text: str = ""  # parallel.layout ("" = the even split)

    @classmethod
    def from_config(cls, model: ModelConfig, schedule: str, pp: int, text: str = "") -> "PipelineLayout":
        if text == "auto":
            raise ValueError("parallel.layout=auto must be resolved by the planner first (hai.plan.layout.resolve)")
        return cls(schedule if pp > 1 else "1f1b", pp, model.num_layers, model.mtp_depth, text)

    @cached_property
    def n_stages(self) -> int:
        return num_stages(self.schedule, self.pp) if self.pp > 1 else 1

    @cached_property
    def specs(self) -> tuple[StageSpec, ...]:
        if self.text:
            return parse_layout(self.text, self.num_layers, self.mtp_depth, self.n_stages)
        return default_layout(self.num_layers, self.mtp_depth, self.n_stages)

    @cached_property
    def layers(self) -> tuple[range, ...]:
        return tuple(sp.layers for sp in self.specs)

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        return rank_stages(self.schedule, self.pp, rank) if self.pp > 1 else (0,)

    def stage_modules(self, stage: int) -> set[str]:
        """Top-level modules (``module_of`` names) the stage uses (MTP re-embeds and shares the head)."""
        sp = self.specs[stage]
        mods = {f"layers.{i}" for i in sp.layers}
        if sp.embed:
            mods.add("embed")
        if sp.head:
            mods |= {"norm", "head"}
        if sp.mtp:
            mods |= {"mtp", "embed", "head"} | ({"norm"} if self.mtp_depth else set())
        return mods

    def rank_modules(self, rank: int) -> set[str]:
        return set().union(*(self.stage_modules(s) for s in self.rank_stages(rank)))

    def holders(self, name: str) -> tuple[int, ...]:
        """Pipeline ranks holding the parameter (or module) ``name``."""
        unit = module_of(name)
        return tuple(r for r in range(self.pp) if unit in self.rank_modules(r))

    def describe(self) -> str:
        return layout_text(self.specs)

    def rank_labels(self) -> dict[int, str]:
        """Row names for traces and Gantt charts: each rank with the stages it holds, e.g. ``rank 0: Et + t*2Lm``."""
        return {r: f"rank {r}: " + " + ".join(self.specs[s].text() for s in self.rank_stages(r))
                for r in range(self.pp)}
