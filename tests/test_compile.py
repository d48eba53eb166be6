"""``train.compile``: the block's elementwise math through torch.compile gives the eager run's training.

Each compiled piece is one graph with no break (dynamo's explain); a single-process run (plain and with V3's
recompute regions) and a pp2 x dp2 x ep2 DualPipe run with the overlap tape and recompute equal the eager
single-process run (fp32: losses rel 1e-5, parameters rtol 1e-4; inductor may fuse and reorder the fp32 reductions,
nothing else changes).
"""

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # two cores shared by every rank

import pytest  # noqa: E402
import torch  # noqa: E402

from dist_utils import run_ranks  # noqa: E402
from hai.model import layers  # noqa: E402
from test_parallel_train import BASE, _compare, _run  # noqa: E402


def _examples():
    x, w, dy = torch.randn(2, 24, 32), torch.rand(32) + 0.5, torch.randn(2, 24, 32)
    rstd = layers.rms_norm_forward.eager(x, w, 1e-6)[1]
    a, b = torch.randn(2, 24, 48), torch.randn(2, 24, 48)
    q, cos, sin = torch.randn(2, 24, 4, 8), torch.randn(24, 4), torch.randn(24, 4)
    return {"rms_norm_forward": (x, w, 1e-6), "rms_norm_backward": (x, w, rstd, dy), "swiglu_forward": (a, b),
            "swiglu_backward": (a, b, a), "apply_rope": (q, cos, sin)}


def test_every_compiled_piece_is_one_graph_without_breaks():
    examples = _examples()
    assert sorted(fn.__name__ for fn in layers.ELEMENTWISE) == sorted(examples)
    for fn in layers.ELEMENTWISE:
        torch._dynamo.reset()
        explain = torch._dynamo.explain(fn)(*examples[fn.__name__])
        assert explain.graph_break_count == 0 and explain.graph_count == 1, (fn.__name__, explain.break_reasons)


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    return _run(["parallel=single", f"out_dir={tmp_path_factory.mktemp('eager')}"])


@pytest.mark.parametrize("recompute", ["none", "v3"])
def test_compiled_single_process_equals_eager(eager, recompute, tmp_path):
    try:
        compiled = _run(["train.compile=true", f"train.recompute={recompute}", f"out_dir={tmp_path}"])
    finally:
        layers.compile_elementwise(False)  # process-wide: later tests run eager
    _compare([compiled], eager)


def _rank(rank, world, overrides):
    return _run(overrides)


@pytest.mark.multiproc
def test_compiled_pipeline_with_overlap_and_recompute_equals_eager(eager, tmp_path):
    results = run_ranks(_rank, 4, ["cluster.gpus_per_node=4", "parallel.pp=2", "parallel.dp=2", "parallel.ep=2",
                                   "parallel.schedule=dualpipe", "train.micro_batch_size=1", "train.recompute=v3",
                                   "train.compile=true", f"out_dir={tmp_path}"])
    _compare(results, eager)
