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

from dataclasses import dataclass
from functools import cached_property

from hai.config import ConfigError, ModelConfig

__all__ = ["SCHEDULE_NAMES", "PipelineLayout", "stage_layer_split", "stage_layers", "num_stages", "rank_stages",
           "param_copies", "check_schedule", "module_of"]

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
class PipelineLayout:
    schedule: str
    pp: int
    num_layers: int
    mtp_depth: int

    @classmethod
    def from_config(cls, model: ModelConfig, schedule: str, pp: int) -> "PipelineLayout":
        return cls(schedule if pp > 1 else "1f1b", pp, model.num_layers, model.mtp_depth)

    @cached_property
    def n_stages(self) -> int:
        return num_stages(self.schedule, self.pp) if self.pp > 1 else 1

    @cached_property
    def layers(self) -> tuple[range, ...]:
        return tuple(stage_layers(self.num_layers, self.n_stages))

    def rank_stages(self, rank: int) -> tuple[int, ...]:
        return rank_stages(self.schedule, self.pp, rank) if self.pp > 1 else (0,)

    def stage_modules(self, stage: int) -> set[str]:
        """Top-level modules (``module_of`` names) the stage uses."""
        mods = {f"layers.{i}" for i in self.layers[stage]}
        if stage == 0:
            mods.add("embed")
        if stage == self.n_stages - 1:
            mods |= {"norm", "head"}
            if self.mtp_depth:
                mods |= {"mtp", "embed"}
        return mods

    def rank_modules(self, rank: int) -> set[str]:
        return set().union(*(self.stage_modules(s) for s in self.rank_stages(rank)))

    def holders(self, name: str) -> tuple[int, ...]:
        """Pipeline ranks holding the parameter (or module) ``name``."""
        unit = module_of(name)
        return tuple(r for r in range(self.pp) if unit in self.rank_modules(r))
