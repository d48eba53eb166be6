"""Peer check: HAI's ZeRO-1 (ZeroAdamW) and DeepSpeed ZeRO stage 1 train the same model to the same parameters.

Both run at dp=2 on gloo from the same ``build_model(seed)`` weights over the same batches, with the same AdamW
(torch arithmetic, decay on dim >= 2 only), warmup + cosine LR, clipping at 1.0, fp32, gradient accumulation over
the same micro-batches and the same router-bias update (see benchmarks/zero1_vs_deepspeed.py for how the two are
matched, including the aux-loss gradient scale). An independent check of our optimizer against the field's reference.

DeepSpeed's first ``initialize`` compiles a C++ op (45-110 s on 2 cores); the build is cached under
~/.cache/hai/torch_extensions (or $TORCH_EXTENSIONS_DIR), so only the first run on a machine pays.
"""

import importlib.util
import os

import pytest
import torch

pytest.importorskip("deepspeed")

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "zero1_vs_deepspeed.py")
_spec = importlib.util.spec_from_file_location("zero1_vs_deepspeed", _PATH)
peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peer)

STEPS = 4
# fp32. With two ranks the gradient sums agree bit for bit (a + b == b + a); what differs is the rounding of the
# gradient norm (DeepSpeed: fp32 per partition, ours: fp64) and of the clip factor (DeepSpeed multiplies by
# 1/((norm + 1e-6)/clip), torch and we by clip/(norm + 1e-6)), i.e. a few ulps per step, carried by AdamW.
ATOL, RTOL = 1e-6, 1e-5
LOSS_RTOL = 1e-6


@pytest.mark.multiproc
def test_zero1_matches_deepspeed_zero_stage1():
    results = peer.compare(STEPS)
    for r in results:
        hai, ds = r["hai"], r["deepspeed"]
        assert hai["loss"] == pytest.approx(ds["loss"], rel=LOSS_RTOL)
        assert hai["grad_norm"] == pytest.approx(ds["grad_norm"], rel=1e-5)
        diff, where = peer.max_param_diff(r)
        for n, p in hai["params"].items():
            torch.testing.assert_close(p, ds["params"][n], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, n=n: f"{n}: {m} (largest difference {diff:.3e} in {where})")
        for a, b in zip(hai["biases"], ds["biases"]):
            torch.testing.assert_close(a, b)
        # both shard master weights + two moments over dp: about the same bytes per rank (padding aside)
        assert hai["state_bytes"] == pytest.approx(ds["state_bytes"], rel=0.01)
    # each implementation leaves identical parameters on every rank
    for name in ("hai", "deepspeed"):
        for n, p in results[0][name]["params"].items():
            assert torch.equal(p, results[1][name]["params"][n]), (name, n)
