"""The checkout's top-level folders never stand in for an installed distribution's top-level module.

`python -m pytest`, `python -c` and a REPL put the current directory first on sys.path; from the checkout root, the
folder `kernels/` (hai.kernels) once shadowed Hugging Face's `kernels`, which transformers imports (issue 22). Each
case runs a fresh interpreter in the checkout root, the way a user types it, with a stand-in "installed" package of
the same name on PYTHONPATH (after the cwd, as site-packages is).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["kernels", "parallel", "pipeline", "launch", "configs"]


def _python(args, site=None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if site is not None:
        env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _installed(tmp_path, names):
    site = tmp_path / "site"
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    (site / "probe.py").write_text(
        "import sys\n" + "".join(f"import {n}\nprint({n}.WHO)\n" for n in names)
        + "import hai.kernels, hai.parallel, hai.pipeline, hai.launch, hai.configs\nprint('hai ok')\n")
    return site


def test_folders_of_the_checkout_are_folders_of_the_checkout():
    # the premise: each folder sits at the checkout root, so cwd-first sys.path can reach it
    for name in FOLDERS:
        assert (ROOT / name / "__init__.py").is_file(), name


@pytest.mark.parametrize("form", ["-c", "-m"])
def test_installed_module_wins_over_checkout_folder(tmp_path, form):
    site = _installed(tmp_path, FOLDERS)
    # -c puts '' first on sys.path, -m the absolute cwd: both are the checkout root here
    args = ["-c", (site / "probe.py").read_text()] if form == "-c" else ["-m", "probe"]
    out = _python(args, site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [w for n in FOLDERS for w in ("installed", n)] + ["hai", "ok"], out.stdout


@pytest.mark.parametrize("name", FOLDERS)
def test_bare_name_without_installed_module_is_not_found(name):
    # -S: no site-packages, so no installed module of that name (Hugging Face's `kernels` is one in the dev venv)
    out = _python(["-S", "-c", f"import {name}"])
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ModuleNotFoundError: No module named '{name}'") and f"hai.{name}" in last, out.stderr


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is in the dev extra")
def test_transformers_hub_kernels_imports_from_checkout_root():
    # the failure of issue 22 as a user met it: transformers >= 5.25 imports Hugging Face's `kernels`
    out = _python(["-c", "import transformers.integrations.hub_kernels as h; import kernels; print(kernels.__file__)"])
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(str(ROOT / "kernels")), out.stdout
