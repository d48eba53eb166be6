"""The throughputs the plan's cost model prices kernels and links with: a calibration table (JSON).

The shipped default, ``calibration_h800.json``, is the published H800 table: DeepGEMM's FP8 GEMM TFLOP/s at V3's
shapes (dense, grouped, weight gradient), DeepEP's all-to-all GB/s per link and EP size, and the SMs V3 gives to
communication; attention and BF16 GEMMs are assumptions there (its ``sources`` say which). ``hai plan
calibration=PATH`` reads another table of the same form, e.g. what a lent GPU measured.

A table is read as fractions of the hardware it was measured on (its ``nominal`` peaks and link GB/s): on that
hardware the cost model gets its numbers back exactly, on another cluster the same fractions of that cluster's peaks
and links. A GEMM is priced at the table entry of its kind nearest in shape (log N, log K); an all-to-all at the
entry of its link nearest in EP size.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from math import log
from pathlib import Path

from hai.config import ConfigError

__all__ = ["DEFAULT_CALIBRATION", "Calibration", "load_calibration"]

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration_h800.json")
_NOMINAL = ("peak_tflops_fp8", "peak_tflops_bf16", "nvlink_gbps", "ib_gbps")


@dataclass(frozen=True, eq=False)  # hashed by identity: load_calibration hands out one instance per path
class Calibration:
    """A loaded table; the ``*_fraction`` / ``*_efficiency`` methods give shares of the nominal hardware."""

    path: str
    name: str
    gpu: str
    nominal: dict
    sms_total: int
    sms_comm: int
    gemm_m: int
    dense: tuple  # (n, k, TFLOP/s) of FP8 dense GEMMs
    grouped: tuple  # (n, k, TFLOP/s) of FP8 grouped (MoE contiguous) GEMMs
    wgrad_tflops: float
    gemm_bf16_efficiency: float
    attention_tflops_bf16: float
    intranode: tuple  # (ep, dispatch GB/s, combine GB/s) over NVLink
    internode: tuple  # (ep, dispatch GB/s, combine GB/s) over RDMA
    sources: dict

    @functools.lru_cache(maxsize=1024)  # the layout search prices the same few shapes many times
    def fp8_gemm_efficiency(self, kind: str, n: int, k: int) -> float:
        """Share of the FP8 peak a GEMM of ``kind`` (dense | grouped | wgrad) with output width n, reduction k gets."""
        if kind == "wgrad":
            return self.wgrad_tflops / self.nominal["peak_tflops_fp8"]
        table = self.dense if kind == "dense" else self.grouped
        _, _, tflops = min(table, key=lambda e: log(e[0] / n) ** 2 + log(e[1] / k) ** 2)
        return tflops / self.nominal["peak_tflops_fp8"]

    def attention_efficiency(self) -> float:
        return self.attention_tflops_bf16 / self.nominal["peak_tflops_bf16"]

    def all_to_all_fraction(self, link: str, ep: int) -> tuple[float, float]:
        """(dispatch, combine) shares of the nominal ``link`` (nvlink | ib) GB/s at the nearest measured EP size."""
        table = self.intranode if link == "nvlink" else self.internode
        _, disp, comb = min(table, key=lambda e: abs(log(e[0] / ep)))
        nominal = self.nominal["nvlink_gbps" if link == "nvlink" else "ib_gbps"]
        return disp / nominal, comb / nominal

    @property
    def compute_share(self) -> float:
        """Share of the SMs left to compute while the all-to-all kernels run beside it."""
        return (self.sms_total - self.sms_comm) / self.sms_total

    def summary(self) -> dict:
        """What the report prints: the table's numbers and where they come from."""
        return {"path": self.path, "name": self.name, "gpu": self.gpu, "nominal": self.nominal,
                "sms": f"{self.sms_comm} of {self.sms_total} for communication",
                "gemm_fp8_tflops_dense": [list(e) for e in self.dense],
                "gemm_fp8_tflops_grouped": [list(e) for e in self.grouped], "wgrad_tflops": self.wgrad_tflops,
                "gemm_bf16_efficiency": self.gemm_bf16_efficiency,
                "attention_tflops_bf16": self.attention_tflops_bf16,
                "all_to_all_gbps": {"intranode": [list(e) for e in self.intranode],
                                    "internode": [list(e) for e in self.internode]},
                "sources": self.sources}


def _get(d: dict, key: str, path: str, kind=float, allow_zero: bool = False):
    if key not in d:
        raise ConfigError(f"calibration={path}: missing key {key!r}: see hai/plan/calibration_h800.json for the form")
    try:
        value = kind(d[key])
    except (TypeError, ValueError):
        raise ConfigError(f"calibration={path}: {key}={d[key]!r} is not a {kind.__name__}") from None
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"calibration={path}: {key}={value} must be {'>=' if allow_zero else '>'} 0")
    return value


def _entries(rows: list, keys: tuple[str, ...], path: str, where: str) -> tuple:
    if not rows:
        raise ConfigError(f"calibration={path}: {where} needs at least one entry with keys {list(keys)}")
    return tuple(tuple(_get(r, k, f"{path} {where}") for k in keys) for r in rows)


@functools.lru_cache(maxsize=8)
def load_calibration(path: str | None = None) -> Calibration:
    """The table at ``path`` (default: the published H800 table shipped with hai)."""
    path = str(path or DEFAULT_CALIBRATION)
    try:
        d = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"calibration={path} cannot be read ({err.strerror}): give the path of a calibration "
                          f"JSON, or leave calibration unset for the published H800 table") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"calibration={path} is not JSON ({err.msg} at line {err.lineno})") from None
    g, a2a, sms = d.get("gemm_fp8_tflops", {}), d.get("all_to_all_gbps", {}), d.get("sms", {})
    nominal = {k: _get(d.get("nominal", {}), k, f"{path} nominal") for k in _NOMINAL}
    comm = _get(sms, "communication", f"{path} sms", int, allow_zero=True)
    total = _get(sms, "total", f"{path} sms", int)
    if comm >= total:
        raise ConfigError(f"calibration={path}: sms.communication={comm} must be below sms.total={total}")
    return Calibration(
        path=path, name=str(d.get("name", Path(path).stem)), gpu=str(d.get("gpu", "?")), nominal=nominal,
        sms_total=total, sms_comm=comm, gemm_m=_get(g, "m", f"{path} gemm_fp8_tflops", int),
        dense=_entries(g.get("dense"), ("n", "k", "tflops"), path, "gemm_fp8_tflops.dense"),
        grouped=_entries(g.get("grouped"), ("n", "k", "tflops"), path, "gemm_fp8_tflops.grouped"),
        wgrad_tflops=_get(g.get("wgrad", {}), "tflops", f"{path} gemm_fp8_tflops.wgrad"),
        gemm_bf16_efficiency=_get(d, "gemm_bf16_efficiency", path),
        attention_tflops_bf16=_get(d, "attention_tflops_bf16", path),
        intranode=_entries(a2a.get("intranode"), ("ep", "dispatch", "combine"), path, "all_to_all_gbps.intranode"),
        internode=_entries(a2a.get("internode"), ("ep", "dispatch", "combine"), path, "all_to_all_gbps.internode"),
        sources={k: "".join(v) if isinstance(v, list) else str(v) for k, v in d.get("sources", {}).items()})
