"""The checkout's top-level folders are HAI's subpackages, never top-level modules.

``python -m pytest``, ``python -c`` and a REPL put the current directory first on ``sys.path``. Typed in the checkout
root, ``import kernels`` would then find the folder ``kernels/`` (which is ``hai.kernels``) before an installed
distribution of that name (Hugging Face's ``kernels``, which transformers imports), and the same for ``parallel``,
``pipeline``, ``launch`` and ``configs``. Each of those folders' ``__init__`` starts with::

    if __name__ != "hai.kernels":
        from hai._shadow import step_aside; step_aside(__name__, __file__)

Imported under any other name, the folder steps aside: the import resolves as if the checkout root were not on
``sys.path`` (to the installed module of that name), or fails with ``ModuleNotFoundError`` naming ``hai.<name>``.
"""

from __future__ import annotations

import importlib
import os
import sys

__all__ = ["step_aside"]


def step_aside(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (this folder, imported by its bare name) with the module that name means
    when the checkout root is not on the import path; raise ModuleNotFoundError when there is none."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    saved = sys.path[:]
    # '' (python -c, a REPL) and the absolute cwd (python -m) both mean the checkout root here.
    sys.path[:] = [p for p in saved if os.path.realpath(p or os.curdir) != root]
    del sys.modules[name]  # this folder's half-made module: the import below must look again
    try:
        sys.modules[name] = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {name}/ of the HAI checkout is the subpackage 'hai.{name}' "
            f"(import hai.{name}), not a top-level module", name=name) from None
    finally:
        sys.path[:] = saved
