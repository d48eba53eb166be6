"""One process's whole model from a HAI checkpoint (any layout, resharded by DCP) or a Hugging Face directory: what
``hai generate`` and ``hai convert`` start from."""

from __future__ import annotations

import torch

__all__ = ["load_model"]


def load_model(cfg, dtype: torch.dtype | None = None):
    """(whole model in eval mode, tokenizer spec) for generation or export: from ``model.init_from=hf:DIR`` (the
    directory's tokenizer.json when it has one) or from the HAI checkpoint ``resume`` names (any layout: the
    checkpoint is resharded into this one process; the run's ``data.tokenizer``). On CPU the GEMMs run in fp32
    (``precision=fp32``, the same weights)."""
    import dataclasses
    import os

    from hai.config import ConfigError, ModelConfig
    from hai.model import build_model, materialize, param_dtype

    device = torch.device("cuda") if cfg.cluster.device == "cuda" and torch.cuda.is_available() else \
        torch.device("cpu")
    if cfg.model.init_from:
        from hai.model.hf import hf_dir, load_into

        mcfg, path = cfg.model, hf_dir(cfg.model.init_from)
        tok = os.path.join(path, "tokenizer.json")
        tokenizer = tok if os.path.isfile(tok) else cfg.data.tokenizer
    else:
        from hai.checkpoint.state import load_model_weights, resolve_resume
        from hai.checkpoint.files import read_meta

        if cfg.resume == "none":
            raise ConfigError("hai generate needs a model: resume=PATH (or auto, with out_dir) for a HAI checkpoint, "
                              "or model.init_from=hf:DIR for a Hugging Face one")
        path = resolve_resume(cfg.resume, cfg.out_dir)
        if path is None:
            raise ConfigError(f"resume={cfg.resume!r}: no complete checkpoint under {cfg.out_dir}: train with "
                              f"train.save_every=N first, or point resume=PATH at a checkpoint directory")
        mcfg, tokenizer = ModelConfig(**read_meta(path)["model"]), cfg.data.tokenizer
    if device.type == "cpu":
        mcfg = dataclasses.replace(mcfg, precision="fp32")
    model = build_model(mcfg, device="meta")
    materialize(model, device, dtype or param_dtype(mcfg), 0, mcfg.init_std)
    if cfg.model.init_from:
        load_into(model, mcfg, path)
    else:
        load_model_weights(model, path)
    return model.eval(), tokenizer
