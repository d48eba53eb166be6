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
    from hai.inference.generate import load_model

    model, _ = load_model(dataclasses.replace(cfg, resume=src, model=dataclasses.replace(cfg.model, init_from=None)),
                          dtype=param_dtype(mcfg))
    info = save(model, mcfg, dst, max_shard_bytes)
    return {"src": src, "dst": dst, **info, "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def hf_to_hai(cfg, src: str, dst: str) -> dict:
    """A one-process trainer initialized from the checkpoint (``model.init_from``), saved as step 0 under
    ``dst/checkpoints``."""
    from hai.data import TokenFile, ensure_token_file
    from hai.model.hf import apply_init_from
    from hai.parallel.topology import Topology
    from hai.train.trainer import Trainer

    t0 = time.perf_counter()
    cfg = apply_init_from(dataclasses.replace(cfg, out_dir=dst, model=dataclasses.replace(cfg.model, init_from=src)))
    topo = Topology.from_config(cfg)
    if topo.world_size != 1:
        raise ValueError(f"hai convert runs in one process: pass cluster=cpu1 parallel=single (the layout was "
                         f"{topo.world_size} ranks); a checkpoint resumes onto any layout")
    trainer = Trainer(cfg, topo, None, TokenFile.open(ensure_token_file(cfg.data)))
    path = trainer.save_checkpoint()
    return {"src": src, "dst": path, **trainer.imported, "seconds": time.perf_counter() - t0}
