"""Materialize a model built on ``meta``: allocate what this rank holds and initialize it as a pure function of
(seed, parameter name, global slice).

Every matrix is Normal(0, std) (V3 used std 0.006), every vector (norm weights) is ones, every buffer (the router's
balancing bias and its load counters) zeros. The random values of a parameter come from a generator seeded with a
hash of (seed, name) and, for the stacked routed-expert weights, of the *global* expert id of each row: so the
shard a rank holds after the parallel layer's ``parallelize`` (a pipeline stage, a slice of the experts) equals the same
slice of the single-process model, and nothing depends on the order in which modules were built or initialized.
Values are drawn in fp32 on the target device (one tensor at a time) and rounded to the parameter dtype.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from hai.config import ModelConfig

__all__ = ["materialize", "param_dtype", "init_key"]


def param_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype of the weights in the modules: bf16 for ``precision=bf16|fp8`` (V3: fp32 master weights live in the
    optimizer), fp32 for ``precision=fp32``."""
    return torch.float32 if cfg.precision == "fp32" else torch.bfloat16


def init_key(seed: int, name: str, index: int | None = None) -> int:
    """63-bit generator seed of one parameter (or of row ``index`` of a stacked expert weight)."""
    text = f"{seed}/{name}" if index is None else f"{seed}/{name}/{index}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def _fill(t: torch.Tensor, key: int, std: float) -> None:
    if t.dim() < 2:
        t.fill_(1.0)
        return
    gen = torch.Generator(device=t.device).manual_seed(key)
    t.copy_(torch.empty(t.shape, dtype=torch.float32, device=t.device).normal_(0.0, std, generator=gen))


@torch.no_grad()
def _init_param(module: nn.Module, pname: str, full_name: str, t: torch.Tensor, seed: int, std: float) -> None:
    tp = getattr(module, "tp_shard", {}).get(pname)
    if tp is not None:  # a tensor-parallel slice: the single-process tensor's values, sliced
        dim, start, size = tp
        shape = list(t.shape)
        shape[dim] = size
        full = torch.empty(shape, dtype=torch.float32, device=t.device)
        _fill(full, init_key(seed, full_name), std)
        t.copy_(full.narrow(dim, start, t.shape[dim]))
        return
    offset = getattr(module, "expert_offset", None)
    if offset is None:
        _fill(t, init_key(seed, full_name), std)
        return
    for e in range(t.shape[0]):  # stacked experts: one generator per global expert row
        _fill(t[e], init_key(seed, full_name, offset + e), std)


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int, std: float) -> nn.Module:
    """Replace every parameter and buffer (on ``meta`` or anywhere) by an initialized tensor on ``device``:
    floating parameters in ``dtype``, buffers keep their dtype. Allocates one parameter at a time. On ``meta`` only
    the dtypes change (what ``hai plan`` counts)."""
    values = torch.device(device).type != "meta"
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(module.named_parameters(recurse=False)):
            t = torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device=device)
            if values:
                _init_param(module, pname, prefix + pname, t, seed, std)
            setattr(module, pname, nn.Parameter(t, requires_grad=p.requires_grad))
        for bname, b in list(module.named_buffers(recurse=False)):
            setattr(module, bname, torch.zeros(b.shape, dtype=b.dtype, device=device))  # keeps persistence
    return model
