"""Ahead-of-time compilation of every FP8 kernel launch HAI makes, for GPUs this machine need not have.

``record_launches()`` runs HAI's launch sites (the functional FP8 pieces that ``fp8_linear``, ``fp8_grouped_linear``
and the model's recompute regions call) on meta tensors at DeepSeek-V3 sizes, with the Triton dispatch forced on
and every kernel launch captured instead of run. ``variants()`` turns the captured arguments into compiled variants
with Triton's own binder (signature, constexprs, divisibility attributes, options: what ``JITFunction.run`` would
compile on a GPU) and ``compile_variant()`` compiles one for a ``GPUTarget`` and reads what the code shows: registers
and spills (``ptxas -v``, as Triton invokes it), shared memory (Triton's dynamic + the cubin's static), the MMA
instructions and their operand types, async copies (cp.async / TMA) per named operand, FMAs.

Needs the kernels as ``JITFunction``s, i.e. TRITON_INTERPRET unset when hai.kernels is imported:
``python -m hai.kernels.aot [--json] [--arch 90 100]`` (benchmarks/kernels_aot.py prints the table).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

__all__ = ["DENSE_SITES", "GROUPED_SITES", "SMEM_LIMIT", "Launch", "Variant", "record_launches", "variants",
           "compile_variant", "table", "main"]

TOKENS = 4096  # tokens of one V3 micro-batch (sequence 4096)
DENSE_SITES = {  # name: (in_features K, out_features N) of V3's FP8 linear layers (hidden 7168)
    "attn.wq_a": (7168, 1536), "attn.wq_b": (1536, 24576), "attn.wkv_a": (7168, 576), "attn.wkv_b": (512, 32768),
    "attn.wo": (16384, 7168), "mlp.w1": (7168, 18432), "mlp.w2": (18432, 7168), "shared.w1": (7168, 2048),
}
GROUPED_SITES = {"experts.w1": (7168, 2048), "experts.w2": (2048, 7168)}  # per expert, V3's moe_intermediate 2048
EXPERT_TOKENS = (700, 0, 1309, 512, 33, 901, 640, 1)  # 8 local experts (EP32): uneven, one empty, ~TOKENS rows
SMEM_LIMIT = 227 * 1024  # bytes per block on H100/H800 (228 KB per SM, 1 KB reserved); B200 the same
_MMA = re.compile(r"\b(wgmma\.mma_async[\w.:]*|tcgen05\.mma[\w.:]*|mma\.sync[\w.:]*)")
_ASYNC = re.compile(r"%(\w+?)(?:_\d+)? = (?:ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local)")
_TC5_OPERANDS = re.compile(r"ttng\.tc_gen5_mma .*?: !ttg\.memdesc<(?:\d+x)+(\w+),.*?!ttg\.memdesc<(?:\d+x)+(\w+),")


@dataclass
class Launch:
    """One captured launch: the kernel (a JITFunction), its grid, arguments, and the site that made it."""

    site: str
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict


@dataclass
class Variant:
    """One compiled variant (what Triton caches a kernel under) and the sites that launch it."""

    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    sites: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def label(self) -> str:
        """What tells this variant from the kernel's others: its declared constexprs, the dtype of each non-fp8
        pointer, and the integer arguments Triton could not specialize as multiples of 16."""
        params = self.kernel.params
        parts = [f"{p.name}={self.constexprs[(p.num,)]}" for p in params if p.is_constexpr and p.name != "EPS"]
        parts += [f"{p.name[:-4]}:{self.signature[p.name][1:]}" for p in params
                  if self.signature[p.name].startswith("*") and "fp8" not in self.signature[p.name]
                  and p.name[:-4] not in ("as", "bs", "s", "tiles", "koff")]
        odd = [p.name for p in params if self.signature[p.name] == "i32" and not self.attrs.get((p.num,))]
        return " ".join(parts + ([f"%16!=0:{','.join(odd)}"] if odd else []))


# ------------------------------------------------------------------------------------------------------ recording
class _Recorder:
    def __init__(self, kernel, log: list, site: Callable[[], str]):
        self.kernel, self.log, self.site = kernel, log, site

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.site(), self.kernel, grid, args, kwargs))


def _pin(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    out = self.clone()
    out._hai_pinned = True  # what is_pinned() says below
    return out


def _is_pinned(self: torch.Tensor, *args, **kwargs) -> bool:
    return getattr(self, "_hai_pinned", False)


@contextlib.contextmanager
def _capturing(log: list, site: Callable[[], str], arch: int) -> Iterator[None]:
    """Every kernel of hai.kernels captured (compiled or interpreted), the dispatch forced onto the Triton launchers,
    the launch options those of sm_<arch>, and pinning emulated: pin_memory needs an accelerator, and host metadata
    bound for meta tensors has nothing to copy (the tests' host-sync counter still sees which copies start pinned)."""
    from triton.runtime.jit import KernelInterface

    from . import gemm, quant

    saved = [(torch.Tensor, "pin_memory", torch.Tensor.pin_memory), (torch.Tensor, "is_pinned", torch.Tensor.is_pinned),
             (gemm, "capability", gemm.capability)]
    for mod in (gemm, quant):
        saved.append((mod, "use_triton", mod.use_triton))
        saved += [(mod, name, obj) for name, obj in vars(mod).items()
                  if isinstance(obj, KernelInterface) and name.endswith("_kernel")]
    own = [name in vars(owner) for owner, name, _ in saved]  # torch.Tensor inherits pin_memory / is_pinned
    try:
        for owner, name, obj in saved:
            new = {"pin_memory": _pin, "is_pinned": _is_pinned, "use_triton": lambda t: True,
                   "capability": lambda t: divmod(arch, 10)}.get(name)
            setattr(owner, name, new or _Recorder(obj, log, site))
        yield
    finally:
        for (owner, name, obj), had in zip(saved, own):
            setattr(owner, name, obj) if had else delattr(owner, name)


def _meta(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _drive_dense(name: str, K: int, N: int, at: Callable[[str], None]) -> None:
    """What _Fp8LinearFn does (forward; backward from its 1x128 cache) and a recompute region's wgrad from x."""
    from .linear import Fp8Rows, fp8_dgrad, fp8_fprop, fp8_wgrad, quantize_rows

    x, w, dy = _meta(TOKENS, K), _meta(N, K), _meta(TOKENS, N)
    at(f"{name} fprop")
    cache = quantize_rows(x)
    fp8_fprop(cache, w, x.dtype)
    at(f"{name} dgrad")
    fp8_dgrad(dy, w, x.dtype)
    at(f"{name} wgrad")
    fp8_wgrad(dy, Fp8Rows(cache.q, cache.s, cache.K, x.dtype))
    at(f"{name} wgrad(recompute)")
    fp8_wgrad(dy, x)


def _drive_grouped(name: str, K: int, N: int, at: Callable[[str], None]) -> None:
    """What _Fp8GroupedLinearFn and the expert recompute region do, for V3's local experts."""
    from .linear import Fp8Rows, fp8_grouped_dgrad, fp8_grouped_fprop, fp8_grouped_wgrad, quantize_rows

    T, E = sum(EXPERT_TOKENS), len(EXPERT_TOKENS)
    x, w, dy = _meta(T, K), _meta(E, N, K), _meta(T, N)
    at(f"{name} fprop")
    cache = quantize_rows(x)
    fp8_grouped_fprop(cache, w, EXPERT_TOKENS, x.dtype)
    at(f"{name} dgrad")
    fp8_grouped_dgrad(dy, w, EXPERT_TOKENS, x.dtype)
    at(f"{name} wgrad")
    fp8_grouped_wgrad(dy, Fp8Rows(cache.q, cache.s, cache.K, x.dtype), EXPERT_TOKENS)


def record_launches(arch: int = 90) -> list[Launch]:
    """Every kernel launch of HAI's FP8 sites at V3 sizes on an sm_<arch> GPU, captured on meta tensors (nothing
    runs)."""
    log, current = [], ["?"]
    with _capturing(log, lambda: current[0], arch):
        for name, (K, N) in DENSE_SITES.items():
            _drive_dense(name, K, N, lambda s: current.__setitem__(0, s))
        for name, (K, N) in GROUPED_SITES.items():
            _drive_grouped(name, K, N, lambda s: current.__setitem__(0, s))
    return log


# -------------------------------------------------------------------------------------------------- specializing
def _binders(target) -> tuple:
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    return backend, lambda kernel: create_function_from_signature(kernel.signature, kernel.params, backend)


def variants(launches: list[Launch], target) -> list[Variant]:
    """Distinct compiled variants of the launches, specialized by Triton's binder as JITFunction.run does."""
    backend, binder_of = _binders(target)
    out: dict[tuple, Variant] = {}
    for ln in launches:
        kwargs = dict(ln.kwargs, debug=False)
        bound, spec, opts = binder_of(ln.kernel)(*ln.args, **kwargs)
        options, signature, constexprs, attrs = ln.kernel._pack_args(backend, kwargs, bound, spec, opts)
        key = (ln.kernel.__name__, str(signature), str(constexprs), str(attrs), str(options))
        v = out.setdefault(key, Variant(ln.kernel, signature, constexprs, attrs, options.__dict__))
        if ln.site not in v.sites:
            v.sites.append(ln.site)
    return list(out.values())


# ----------------------------------------------------------------------------------------------------- compiling
def _ptxas_v(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """ptxas -v with Triton's flags: registers, spill stores/loads and stack frame bytes."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        res = subprocess.run([str(Path(get_ptxas(arch).path).parent / "cuobjdump"), "--dump-resource-usage",
                              str(src) + ".o"], capture_output=True, text=True).stdout
    num = lambda pat, text=log: int(re.search(pat, text).group(1))  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack": num(r"(\d+) bytes stack frame"),
            "static_smem": num(r"SHARED:(\d+)", res)}


def _mma(ptx: str, ttgir: str) -> tuple[list[str], bool]:
    """The MMA instructions and whether both operands of each are e4m3 (wgmma names the types; tcgen05 kind::f8f6f4
    takes them from the shared-memory descriptors, so the TTGIR's operand types are read there)."""
    found = sorted(set(_MMA.findall(ptx)))
    e4m3 = bool(found) and all(
        m.endswith(".e4m3.e4m3") if m.startswith("wgmma") else "kind::f8f6f4" in m for m in found)
    if any(m.startswith("tcgen05") for m in found):
        ops = _TC5_OPERANDS.findall(ttgir)
        e4m3 = e4m3 and bool(ops) and all(a == b == "f8E4M3FN" for a, b in ops)
    return found, e4m3


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile ``v`` for sm_<arch> and report what the code shows (one row of the table)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ck = triton.compile(ASTSource(v.kernel, v.signature, v.constexprs, v.attrs),
                        target=GPUTarget("cuda", arch, 32), options=v.options)
    ptx, ttgir = ck.asm["ptx"], ck.asm["ttgir"]
    mma, e4m3 = _mma(ptx, ttgir)
    res = _ptxas_v(ptx, arch, v.options["enable_fp_fusion"])
    async_copies: dict[str, int] = {}
    for operand in _ASYNC.findall(ttgir):
        async_copies[operand] = async_copies.get(operand, 0) + 1
    return {"kernel": v.name, "variant": v.label, "sites": v.sites, "arch": f"sm_{arch}", **res,
            "smem": ck.metadata.shared + res["static_smem"], "mma": mma, "mma_e4m3": e4m3,
            "async_copies": async_copies, "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
            "num_warps": v.options["num_warps"], "num_stages": v.options["num_stages"],
            "fp_fusion": v.options["enable_fp_fusion"], "ttir": ck.asm["ttir"]}


def compile_all(archs: tuple[int, ...] = (90,)) -> list[dict]:
    """Record the launches once and compile every variant for every arch."""
    from triton.backends.compiler import GPUTarget

    return [compile_variant(v, arch) for arch in archs
            for v in variants(record_launches(arch), GPUTarget("cuda", arch, 32))]


# ------------------------------------------------------------------------------------------------------- report
def _site_summary(sites: list[str]) -> str:
    roles = sorted({s.split(" ", 1)[1] for s in sites})
    return f"{len(sites)} sites: {', '.join(roles)}"


def _mma_label(mma: list[str]) -> str:
    short = {"wgmma.mma_async.sync.aligned.": "wgmma ", "tcgen05.mma.cta_group::1.": "tcgen05 ", ".f32.": " f32 "}
    out = []
    for m in mma:
        for k, v in short.items():
            m = m.replace(k, v)
        out.append(m.replace("e4m3.e4m3", "e4m3xe4m3"))
    return ", ".join(out) or "-"


def table(rows: list[dict]) -> str:
    """kernel, variant, target, registers, spill bytes (stores+loads), shared memory, warps/stages, MMA, async
    copies per operand, launch sites."""
    head = (f"{'kernel':<27} {'target':<6} {'regs':>4} {'spill':>5} {'smem KB':>7} {'w/st':>4}  {'MMA':<32} "
            f"{'async copies':<12} launched by / variant")
    lines = [head, "-" * 120]
    for r in rows:
        copies = " ".join(f"{k}:{n}" for k, n in sorted(r["async_copies"].items())) or "-"
        lines.append(f"{r['kernel'][1:]:<27} {r['arch']:<6} {r['registers']:>4} "
                     f"{r['spill_stores'] + r['spill_loads']:>5} {r['smem'] / 1024:>7.1f} "
                     f"{r['num_warps']:>2}/{r['num_stages']:<1}  {_mma_label(r['mma']):<32} {copies:<12} "
                     f"{_site_summary(r['sites'])}")
        lines.append(f"{'':<48}{r['variant']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90, 100)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.add_argument("--ir", action="store_true", help="with --json: include each variant's TTIR")
    args = p.parse_args(argv)
    rows = compile_all(tuple(args.arch))
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k != "ttir" or args.ir} for r in rows]))
    else:
        print(table(rows))
    return rows


if __name__ == "__main__":
    main()
