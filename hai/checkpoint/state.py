"""Crash-proof checkpoints with torch.distributed.checkpoint (DCP), resumable onto another data-parallel size.

Layout: ``OUT_DIR/checkpoints/step_00000120/`` holds DCP's ``.metadata`` and ``__R_I.distcp`` files, ``hai.json``
(step, layout, the model and train config, the size and CRC-32 of every file) and an empty ``COMPLETE`` marker.
A save writes ``.tmp-step_…`` first (all ranks, through DCP), then rank 0 writes ``hai.json`` and ``COMPLETE``,
fsyncs, and renames the directory into place; only then are checkpoints beyond ``train.keep_last`` deleted. So a kill
at any moment leaves the previous checkpoint intact, and a half-written one is never mistaken for complete.

Keys (all tensors; nothing is pickled):

- ``model.<name>``: ``model.state_dict()``: parameters and persistent buffers (router biases). Replicated copies
  are written once (DCP de-duplicates equal keys).
- ``optim.<param>.master|exp_avg|exp_avg_sq``: the ZeRO-1 state of each parameter as a flat 1-D tensor of its numel
  elements. Each rank writes the slice its optimizer shard holds (a contiguous range of the flattened parameter);
  on load each rank reads the slice its new shard needs, so the data-parallel size may change (DCP reshards).
  Keyed by parameter name, not by bucket, so a different bucketing or stage split still finds its state.
  Routed-expert tensors sharded over the "ep" axis are written at their global rows (expert j of E), so the ep size
  may change too; a parameter held by several pipeline ranks (DualPipe's two copies) is written by the lowest one.
  The weights tensor parallelism splits (attention heads, MLP columns, vocabulary rows) keep their optimizer state
  in their 2-D global shape and every TP slice writes its rectangle(s), so the tp size may change as well.
- ``optim.step_count`` (Adam's bias-correction step; skipped steps do not count), ``trainer.step`` (= the data
  position: the sampler is a pure function of the step), ``rng.<rank>.{torch,cuda,python,numpy…}``.

Loading reads tensors with ``torch.load(weights_only=True)`` (DCP's reader) and DCP's pickled ``.metadata`` through
an unpickler that admits only DCP's metadata classes; byte (pickled-object) entries are refused. Paths, the atomic
commit and the on-disk checks live in ``hai.checkpoint.files``.
"""

from __future__ import annotations

import os
import pickle
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from hai.checkpoint.files import (FORMAT, META_FILE, CheckpointError, check_model, checkpoint_error, checkpoint_root,
                                  clean_stale, commit_checkpoint, crc32, file_info, latest_checkpoint, list_checkpoints,
                                  read_meta, resolve_resume)

__all__ = ["CheckpointError", "RunState", "Progress", "ShardLayout", "ModelState", "OptimizerState", "save_checkpoint",
           "checkpoint_state", "checkpoint_meta", "write_checkpoint", "load_checkpoint", "load_model_weights",
           "latest_checkpoint", "list_checkpoints", "resolve_resume", "resume_path", "verify_checkpoint",
           "checkpoint_root"]

# ----------------------------------------------------------------------------------------------------------------------
# ZeRO-1 state as per-parameter flat slices
# ----------------------------------------------------------------------------------------------------------------------

class _Piece:
    """This rank's blocks of a tensor of global shape ``size`` in DCP's ``_Checkpointable`` protocol: ``tensor`` at
    ``offsets`` (``tensor=None``: this rank holds none of it), or several ``(tensor, offsets)`` blocks (a TP-split
    parameter's optimizer range, cut into rectangles). Each tensor is a view into the optimizer shard or the
    module's parameter, so loading writes straight into it."""

    def __init__(self, tensor: torch.Tensor | None, offsets: tuple[int, ...], size: tuple[int, ...],
                 blocks: list[tuple[torch.Tensor, tuple[int, ...]]] | None = None):
        self.global_size = torch.Size(size)
        blocks = blocks if blocks is not None else ([] if tensor is None else [(tensor, offsets)])
        self.blocks = [(t, torch.Size(o)) for t, o in blocks]

    def size(self) -> torch.Size:
        return self.global_size

    def _chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=o, sizes=t.size()) for t, o in self.blocks]

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, o), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=o, sizes=t.size()),
                                                      properties=TensorProperties.create_from_tensor(t),
                                                      size=self.global_size)) for t, o in self.blocks]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return self._chunks()

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        for t, o in self.blocks:
            if index.offset is None or torch.Size(index.offset) == o:
                return t
        raise ValueError(f"{index.fqn}: no local block at offset {index.offset}")


def _rectangles(flat: torch.Tensor, a: int, z: int, cols: int, row0: int, col0: int) -> list[tuple]:
    """Elements [a, z) of a row-major (rows, cols) local block whose (0, 0) sits at global (row0, col0), as at most
    three rectangles of the global 2-D tensor: a partial first row, whole rows, a partial last row. ``flat`` holds
    those elements (a view of the optimizer shard)."""
    out, i = [], a
    while i < z:
        r, c = divmod(i, cols)
        n = min(cols - c, z - i) if c or z - i < cols else (z - i) // cols * cols
        block = flat[i - a:i - a + n]
        out.append((block.view(1, n) if c or n < cols else block.view(n // cols, cols), (row0 + r, col0 + c)))
        i += n
    return out


class ShardLayout:
    """Where this rank's tensors sit in the global ones: routed-expert parameters stacked as (E, ...) and sharded by
    rows over the "ep" axis (expert j on ep rank j // (E / ep)); tensor-parallel slices at their global offset along
    their split dimension; parameters held by several pipeline ranks (DualPipe's two copies of a stage, an embedding
    shared by the first and last stage) are written by the lowest one, parameters every TP rank holds whole by TP
    rank 0."""

    def __init__(self, model: nn.Module, n_experts: int, ep: int = 1, coords: dict | None = None, placement=None):
        from hai.parallel.tensor_parallel import tp_split_dim
        from hai.parallel.zero import is_expert_param

        self._is_expert, self.tp_split_dim = is_expert_param, tp_split_dim
        coords = coords or {}
        self.ep, self.ep_rank, self.pp_rank = ep, coords.get("ep", 0), coords.get("pp", 0)
        self.experts = n_experts
        holders = placement.holders if placement is not None else {}
        self.secondary = {n for n, h in holders.items() if h and h[0] != self.pp_rank}
        if coords.get("tp", 0):
            self.secondary |= set(getattr(placement, "tp_replicated", ()))
        self.tp_shards = {}  # name -> (dim, first global index, global size)
        for mod_name, module in model.named_modules():
            for pname, spec in getattr(module, "tp_shard", {}).items():
                self.tp_shards[f"{mod_name}.{pname}" if mod_name else pname] = spec

    def expert_rows(self, name: str, t: torch.Tensor) -> tuple[int, int] | None:
        """(first global row, global rows) of an ep-sharded expert tensor; None for everything else."""
        if self.ep == 1 or not self._is_expert(name) or t.dim() == 0:
            return None
        local = self.experts // self.ep
        if t.shape[0] != local or local == self.experts:
            return None  # not sharded (yet): every rank holds all experts
        return self.ep_rank * local, self.experts

    def tp_block(self, name: str, t: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(global offsets, global shape) of a (possibly TP-split) weight; the whole tensor at tp = 1."""
        dim, start, size = self.tp_shards.get(name, (0, 0, t.shape[0]))
        offsets, shape = [0] * t.dim(), list(t.shape)
        offsets[dim], shape[dim] = start, size
        return tuple(offsets), tuple(shape)


class ModelState:
    """DCP Stateful: ``<name>`` -> the module's parameters and persistent buffers (router biases), expert and TP
    shards as pieces of their global tensors. The values are the module's own tensors, so loading fills them."""

    def __init__(self, model: nn.Module, layout: ShardLayout):
        self.model, self.layout = model, layout

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.model.state_dict().items():
            rows = self.layout.expert_rows(k, v)
            if rows is not None:
                out[k] = _Piece(v, (rows[0],) + (0,) * (v.dim() - 1), (rows[1],) + tuple(v.shape[1:]))
            elif k in self.layout.tp_shards:
                out[k] = _Piece(v, *self.layout.tp_block(k, v))
            else:
                out[k] = v
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # loaded in place


class OptimizerState:
    """DCP Stateful over ``ZeroAdamW.shard_state()``: ``<param>.master|exp_avg|exp_avg_sq`` -> this rank's piece of
    the parameter's (global) state, and ``step_count``. Flat 1-D, except the weights tensor parallelism splits: those
    keep their 2-D global shape (at any tp, so a checkpoint moves between tp sizes), this rank's range cut into
    rectangles. ``saving``: a parameter another rank writes (a secondary copy) is left out."""

    def __init__(self, optimizer, layout: ShardLayout, saving: bool):
        self.optimizer, self.layout, self.saving = optimizer, layout, saving

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_count": torch.tensor(self.optimizer.step_count, dtype=torch.int64, device="cpu")}
        for sh in self.optimizer.shard_state():
            mine = sh.lo < sh.hi and not (self.saving and sh.name in self.layout.secondary)
            for kind in self.optimizer.STATE_KINDS:
                out[f"{sh.name}.{kind}"] = self._piece(sh, sh.state.get(kind) if mine else None)
        return out

    def _piece(self, sh, view: torch.Tensor | None) -> _Piece:
        p, layout = sh.param, self.layout
        if layout.tp_split_dim(sh.name) is not None and p.dim() == 2:
            (row0, col0), shape = layout.tp_block(sh.name, p)
            blocks = _rectangles(view, sh.lo, sh.hi, p.shape[1], row0, col0) if view is not None else []
            return _Piece(None, (), shape, blocks=blocks)
        rows = layout.expert_rows(sh.name, p)
        n = p.numel()
        base, total = (0, n) if rows is None else (rows[0] * (n // p.shape[0]), rows[1] * (n // p.shape[0]))
        return _Piece(view, (base + sh.lo if view is not None else 0,), (total,))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.step_count = int(state["step_count"])  # the shard itself was loaded in place


class Progress:
    """DCP Stateful: the run's position. ``step`` is also the data position (the sampler is a pure function of it);
    ``run_id`` (the metrics/wandb run this training continues) travels in hai.json."""

    def __init__(self, step: int = 0, run_id: str | None = None):
        self.step, self.run_id = step, run_id

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64, device="cpu")}  # host values: CPU on every device

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.step = int(state["step"])


@dataclass
class RunState:
    """What a checkpoint holds: the model, the optimizer's shard state and the run's progress (each a DCP
    Stateful), where this rank's tensors sit in the global ones, and the topology the hai.json records."""

    model: nn.Module
    optimizer: Any  # hai.parallel.ZeroAdamW
    progress: Progress
    layout: ShardLayout
    topo: Any  # hai.parallel.Topology
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def parts(self, saving: bool) -> dict[str, Any]:
        return {"model": ModelState(self.model, self.layout),
                "optim": OptimizerState(self.optimizer, self.layout, saving),
                "trainer": self.progress}


def _flat(parts: dict[str, Any]) -> dict[str, Any]:
    """The Stateful parts' entries as one flat DCP state dict (``<part>.<key>``: the on-disk keys)."""
    return {f"{name}.{k}": v for name, part in parts.items() for k, v in part.state_dict().items()}


def _unflat(parts: dict[str, Any], state: dict[str, Any]) -> None:
    for name, part in parts.items():
        pre = name + "."
        part.load_state_dict({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, _Piece):
            return obj.__get_tensor_shard__(index)
        return super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        slices = {k: v for k, v in state_dict.items() if isinstance(v, _Piece)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        # DCP's meta-tensor initialization pass replaces objects it does not know with None: put the slices back
        state_dict.update(slices)
        self.state_dict.update(slices)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict.get(index.fqn)
        if isinstance(obj, _Piece):
            return obj.__get_tensor_shard__(index)
        return super().lookup_tensor(index)

    def load_bytes(self, read_item, value) -> None:  # a pickled object: never unpickled
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object; HAI checkpoints "
                              f"hold tensors only and never unpickle arbitrary objects")


_META_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
     ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` admitting only DCP's metadata classes, torch.Size, dtypes and layouts."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _META_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any):
        with open(os.path.join(self.path, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------------------------------------------------
# state
# ----------------------------------------------------------------------------------------------------------------------

def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _gather(obj: Any, group=None) -> list:
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, obj, group=group)
        return out
    return [obj]


def _broadcast(obj: Any) -> Any:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _rng_state(rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {f"rng.{rank}.torch": torch.get_rng_state(),
             f"rng.{rank}.python": torch.tensor(py[1], dtype=torch.int64, device="cpu"),
             f"rng.{rank}.numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),  # CPU by construction
             f"rng.{rank}.numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64, device="cpu"),
             f"rng.{rank}.numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64, device="cpu")}
    if device.type == "cuda":
        state[f"rng.{rank}.cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    torch.set_rng_state(state[f"rng.{rank}.torch"])
    random.setstate((3, tuple(int(x) for x in state[f"rng.{rank}.python"].tolist()), None))
    pos, has_gauss = state[f"rng.{rank}.numpy_pos"].tolist()
    np.random.set_state(("MT19937", state[f"rng.{rank}.numpy_keys"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), float(state[f"rng.{rank}.numpy_gauss"][0])))
    if device.type == "cuda" and f"rng.{rank}.cuda" in state:
        torch.cuda.set_rng_state(state[f"rng.{rank}.cuda"], device)


# ----------------------------------------------------------------------------------------------------------------------
# save
# ----------------------------------------------------------------------------------------------------------------------

def save_checkpoint(run: RunState, out_dir: str, keep_last: int, config: dict[str, Any]) -> str:
    """Collective: every rank calls it. Writes ``OUT_DIR/checkpoints/step_N`` atomically (keeping the last
    ``keep_last``); ``config`` (the model and train sections) goes into hai.json. Returns the directory.
    (``hai.checkpoint.async_save`` runs the same write in the background from a staged copy.)"""
    return write_checkpoint(checkpoint_state(run), checkpoint_meta(run, config), out_dir, keep_last)


def checkpoint_state(run: RunState) -> dict[str, Any]:
    """The flat DCP state dict this rank saves (live tensors and ``_Piece`` views, its RNG states)."""
    rank, _ = _rank_world()
    state = _flat(run.parts(saving=True))
    state.update(_rng_state(rank, run.device))
    return state


def checkpoint_meta(run: RunState, config: dict[str, Any]) -> dict[str, Any]:
    """hai.json's fields known when the save starts (the files' sizes and checksums are added by the write)."""
    _, world = _rank_world()
    topo = run.topo
    return {"format": FORMAT, "step": run.progress.step, "optimizer_steps": run.optimizer.step_count,
            "world_size": world, "pp": topo.pp, "dp": topo.dp, "ep": topo.ep, "tp": topo.tp, "time": time.time(),
            **config, "run_id": run.progress.run_id}


def write_checkpoint(state: dict[str, Any], meta: dict[str, Any], out_dir: str, keep_last: int,
                     group=None) -> str:
    """Collective over ``group`` (default: the world): the temp directory, DCP's write of ``state``, every file's
    size and CRC-32, rank 0's atomic commit (hai.json, COMPLETE, rename, prune). Returns the final directory."""
    root = checkpoint_root(out_dir)
    rank, _ = _rank_world()
    name = f"step_{meta['step']:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        clean_stale(root)
        os.makedirs(tmp)
    _barrier(group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns when it runs without a process group (one process)
        dcp.save(state, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True,
                                                        thread_count=1), planner=_SavePlanner(), process_group=group)
    mine = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_"))
    files = {k: v for part in _gather(file_info(tmp, mine), group) for k, v in part.items()}
    if rank == 0:
        files.update(file_info(tmp, [".metadata"]))
        commit_checkpoint(tmp, final, root, {**meta, "files": files}, keep_last)
    _barrier(group)
    return final


# ----------------------------------------------------------------------------------------------------------------------
# verify + load
# ----------------------------------------------------------------------------------------------------------------------

def _check_files(path: str, meta: dict) -> None:
    """Sizes of every file (each rank); CRC-32 of a 1/world share of them per rank, results gathered."""
    files = meta.get("files") or {}
    if ".metadata" not in files:
        raise checkpoint_error(path, f"lists no DCP .metadata in {META_FILE}")
    bad = []
    for name, info in sorted(files.items()):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            bad.append(f"{name} is missing")
        elif os.path.getsize(p) != info["size"]:
            bad.append(f"{name} is truncated or padded ({os.path.getsize(p)} bytes, {info['size']} written)")
    if bad:
        raise checkpoint_error(path, "is damaged: " + "; ".join(bad))
    rank, world = _rank_world()
    mine = [n for i, n in enumerate(sorted(files)) if i % world == rank]
    bad = [f"{n} fails its CRC-32 check" for n in mine if crc32(os.path.join(path, n)) != files[n]["crc32"]]
    bad = [b for part in _gather(bad) for b in part]
    if bad:
        raise checkpoint_error(path, "is corrupt: " + "; ".join(bad))


def verify_checkpoint(path: str, model_cfg=None) -> dict:
    """Check marker, metadata, file sizes and checksums (and the model config); returns hai.json's content."""
    path = os.path.abspath(path)
    meta = read_meta(path)
    if model_cfg is not None:
        check_model(path, meta, model_cfg)
    _check_files(path, meta)
    return meta


def _dcp_load(state: dict, path: str) -> None:
    """DCP-load ``state`` in place from ``path`` through the safe reader; any failure becomes a CheckpointError
    naming the path and the fix."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, storage_reader=SafeReader(path), planner=_LoadPlanner())
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - DCP wraps per-rank failures; report them with the path and the fix
        raise checkpoint_error(path, f"could not be loaded ({type(e).__name__}: {str(e).strip()[:500]})") from None


def load_checkpoint(run: RunState, path: str, model_cfg=None) -> dict:
    """Collective: restore model, optimizer shards, progress and RNG from ``path`` (any dp, ep, tp or pipeline
    layout) into ``run``'s objects. Returns hai.json."""
    path = os.path.abspath(path)
    meta = verify_checkpoint(path, model_cfg)
    rank, _ = _rank_world()
    reader = SafeReader(path)
    try:
        saved = reader.read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is reported with the path and the fix
        raise checkpoint_error(path, f"has unreadable DCP metadata ({type(e).__name__}: {e})") from None
    parts = run.parts(saving=False)
    state = _flat(parts)
    rng = {k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype, device="cpu")
           for k in _rng_state(rank, run.device) if k in saved}
    state.update(rng)
    missing = sorted(k for k in state if k not in saved)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} this "
                              f"model needs ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): it was "
                              f"written by another model or code version; resume with that, or resume=none")
    _dcp_load(state, path)
    _unflat(parts, state)
    run.progress.run_id = meta.get("run_id")
    if len(rng) == len(_rng_state(rank, run.device)):
        _set_rng_state(state, rank, run.device)
    return meta


def load_model_weights(model, path: str, model_cfg=None) -> dict:
    """Load only the model entries of a checkpoint (any layout: DCP reshards) into ``model`` (e.g. one process for
    generation or export). Returns hai.json."""
    path = os.path.abspath(path)
    meta = verify_checkpoint(path, model_cfg)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    _dcp_load(state, path)
    return meta


def resume_path(cfg) -> str | None:
    """Rank 0 resolves ``cfg.resume`` and every rank gets its answer (one decision for the whole job)."""
    rank, _ = _rank_world()
    answer: tuple = ("ok", None)
    if rank == 0:
        try:
            answer = ("ok", resolve_resume(cfg.resume, cfg.out_dir))
        except CheckpointError as e:
            answer = ("error", str(e))
    status, value = _broadcast(answer)
    if status == "error":
        raise CheckpointError(value)
    return value
