"""Checkpoint directories on disk: where they live, how a save is committed atomically, and the checks on what a
run finds there (marker, metadata, model). The DCP state and the collective save/load are in ``hai.checkpoint``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import zlib

__all__ = ["CheckpointError", "checkpoint_root", "list_checkpoints", "latest_checkpoint", "resolve_resume", "FORMAT",
           "META_FILE", "check_model", "checkpoint_error", "clean_stale", "commit_checkpoint", "crc32", "file_info",
           "read_meta"]

FORMAT = "hai-checkpoint-2"  # 2: TP-splittable weights' optimizer state kept 2-D
META_FILE, MARKER = "hai.json", "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# model fields that do not change the parameter set or its meaning: a run may resume with another value (the
# attention core, and the context window: V3's extension (sec. 4.3) resumes a 4K checkpoint at 32K with YaRN on)
_MODEL_FREE_KEYS = {"name", "precision", "init_std", "bias_update_speed", "seq_aux_alpha", "mtp_lambda", "attention",
                    "max_seq_len", "rope_factor", "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow",
                    "rope_mscale", "rope_mscale_all_dim"}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or from another model; the message names the path and the fix."""


# ----------------------------------------------------------------------------------------------------------------------
# paths
# ----------------------------------------------------------------------------------------------------------------------

def checkpoint_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _step_of(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoints under ``root`` (``COMPLETE`` marker and ``hai.json`` present), oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step, path = _step_of(name), os.path.join(root, name)
        if step is not None and os.path.isfile(os.path.join(path, MARKER)) and \
                os.path.isfile(os.path.join(path, META_FILE)):
            found.append((step, path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str) -> str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, out_dir: str) -> str | None:
    """The checkpoint directory ``resume`` names: none → None; auto → newest complete one under OUT_DIR/checkpoints
    (None when there is none yet); a checkpoint directory; or a run / checkpoints directory (its newest)."""
    if resume in ("", "none", None):
        return None
    if resume == "auto":
        return latest_checkpoint(checkpoint_root(out_dir))
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(os.path.join(path, ".metadata")):
        return path
    for root in (checkpoint_root(path), path):
        newest = latest_checkpoint(root)
        if newest:
            return newest
    raise CheckpointError(f"resume={resume!r}: {path} is not a checkpoint directory (no {META_FILE}) and holds no "
                          f"complete checkpoint: point resume at OUT_DIR/checkpoints/step_NNNNNNNN, use resume=auto "
                          f"to take the newest under out_dir, or resume=none to start fresh")


# ----------------------------------------------------------------------------------------------------------------------
# atomic commit and file integrity
# ----------------------------------------------------------------------------------------------------------------------

def crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_info(directory: str, names: list[str]) -> dict[str, dict]:
    return {n: {"size": os.path.getsize(os.path.join(directory, n)), "crc32": crc32(os.path.join(directory, n))}
            for n in names}


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """Rename first (so a half-deleted checkpoint never looks complete), then delete."""
    trash = os.path.join(os.path.dirname(path), f".trash-{os.path.basename(path)}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(root: str) -> None:
    for name in os.listdir(root):
        if name.startswith(".tmp-") or name.startswith(".trash-"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def commit_checkpoint(tmp: str, final: str, root: str, meta: dict, keep_last: int) -> None:
    """Rank 0, after every rank's data is on disk: hai.json, COMPLETE, fsync, rename into place, prune."""
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(f"{meta['step']}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_path(tmp)
    if os.path.exists(final):  # re-saving a step (e.g. after resume=PATH of an older one)
        _remove_tree(final)
    os.rename(tmp, final)
    _fsync_path(root)
    for old in list_checkpoints(root)[:-keep_last]:
        _remove_tree(old)


# ----------------------------------------------------------------------------------------------------------------------
# checks
# ----------------------------------------------------------------------------------------------------------------------

def checkpoint_error(path: str, problem: str) -> CheckpointError:
    root = os.path.dirname(path)
    return CheckpointError(
        f"checkpoint {path} {problem}: delete it (rm -r {path}) so resume=auto takes the previous complete one "
        f"under {root}, point resume=PATH at another checkpoint, or start fresh with resume=none")


def read_meta(path: str) -> dict:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist: check resume=PATH, or use resume=auto / resume=none")
    if not os.path.isfile(os.path.join(path, MARKER)):
        raise checkpoint_error(path, f"is incomplete (no {MARKER} marker: its save was interrupted)")
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise checkpoint_error(path, f"has an unreadable {META_FILE} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise checkpoint_error(path, f"is not a {FORMAT} checkpoint (format {found!r})")
    return meta


def check_model(path: str, meta: dict, model_cfg) -> None:
    now = dataclasses.asdict(model_cfg)
    saved = meta.get("model", {})
    diff = [f"model.{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in now
            if k not in _MODEL_FREE_KEYS and saved.get(k) != now[k]]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model ({'; '.join(diff)}): resume with the model "
            f"config it was trained with (model={saved.get('name')} and the same overrides), or start fresh with "
            f"resume=none / another out_dir")
