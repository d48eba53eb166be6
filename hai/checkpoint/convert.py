"""`hai convert`: a HAI checkpoint (any layout) to a Hugging Face directory, and a Hugging Face directory to a HAI
checkpoint (step 0: the weights, fresh optimizer state) that ``resume=PATH`` continues from."""

from __future__ import annotations

import dataclasses
import time

__all__ = ["hai_to_hf", "hf_to_hai"]


def hai_to_hf(cfg, src: str, dst: str, max_shard_bytes: int) -> dict:
    """Reshard the checkpoint's model into one process (its own dtype) and write it in the release's layout."""
    import resource

    from hai.checkpoint.files import read_meta
    from hai.config import ModelConfig
    from hai.model.hf import save
    from hai.model import param_dtype

    t0 = time.perf_counter()
    mcfg = ModelConfig(**read_meta(src)["model"])
    from hai.checkpoint.load import load_model

    model, _ = load_model(dataclasses.replace(cfg, resume=src, model=dataclasses.replace(cfg.model, init_from=None)),
                          dtype=param_dtype(mcfg))
    info = save(model, mcfg, dst, max_shard_bytes)
    return {"src": src, "dst": dst, **info, "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def hf_to_hai(cfg, src: str, dst: str) -> dict:
    """The released weights read into one process, saved as a step-0 HAI checkpoint under ``dst/checkpoints``: the
    weights with a fresh ZeRO-1 state (master weights = the weights, zero moments), which ``resume=PATH`` continues
    on any layout. Builds the model and its optimizer only: no trainer, no data."""
    from hai.checkpoint.state import Progress, RunState, ShardLayout, save_checkpoint
    from hai.model import build_model, param_dtype
    from hai.model.hf import apply_init_from, hf_dir, load_into
    from hai.parallel.topology import Topology
    from hai.parallel.zero import ZeroAdamW

    t0 = time.perf_counter()
    cfg = apply_init_from(dataclasses.replace(cfg, out_dir=dst, model=dataclasses.replace(cfg.model, init_from=src)))
    topo = Topology.from_config(cfg)
    if topo.world_size != 1:
        raise ValueError(f"hai convert runs in one process: pass cluster=cpu1 parallel=single (the layout was "
                         f"{topo.world_size} ranks); a checkpoint resumes onto any layout")
    t = cfg.train
    model = build_model(cfg.model, t.seed, dtype=param_dtype(cfg.model))
    imported = load_into(model, cfg.model, hf_dir(src))
    optimizer = ZeroAdamW(model.named_parameters(), t)
    run = RunState(model, optimizer, Progress(0), ShardLayout(model, cfg.model.n_routed_experts), topo)
    path = save_checkpoint(run, dst, t.keep_last, {"model": dataclasses.asdict(cfg.model),
                                                   "train": dataclasses.asdict(t)})
    return {"src": src, "dst": path, **imported, "seconds": time.perf_counter() - t0}
