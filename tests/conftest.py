import os

# Several gloo ranks share two cores: one OpenMP thread each (set before torch is imported by any test module).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# Triton kernels run under the interpreter on CPU-only machines. @triton.jit chooses the interpreter when the kernel
# module is imported, so this must be set before any test module imports hai.kernels. Model tests that want the fast
# torch reference path instead delete it in-process (hai.kernels reads it again at call time).
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (see README, 'GPU checks')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
