import os

# Several gloo ranks share two cores: one OpenMP thread each (set before torch is imported by any test module).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run on a GPU machine (see README, 'GPU checks')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
