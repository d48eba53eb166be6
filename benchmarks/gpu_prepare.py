"""What a lent GPU machine lacks, prepared here as wheels that travel with the checkout, and installed there offline.

A lent GPU machine is a bare image with no network: Python 3.12, torch (CUDA), Triton, numpy, safetensors, tqdm,
matplotlib, transformers, pytest, PyYAML, packaging, pip; no hydra-core, omegaconf or antlr4 (and no wandb, which
HAI imports only when wandb.mode is not disabled). It gets a copy of the checkout plus at most 64 MiB of ignored paths
(``carry``) and one command line of at most 2,000 characters.

Here (network to PyPI), once::

    python benchmarks/gpu_prepare.py                 # -> .gpu_wheels/ (ignored; ~2 MiB), carry=[".gpu_wheels"]

downloads the missing dependencies as cp312 manylinux / py3-none-any wheels (``pip download --only-binary=:all:
--python-version 3.12 --platform manylinux...``, ``--no-deps``: never torch, triton or nvidia packages), builds
antlr4-python3-runtime 4.9.3 (an sdist only) into a wheel with ``pip wheel``, and adds setuptools and wheel so HAI
itself builds there without an index. There (what ``bash benchmarks/gpu_check.sh --wheels .gpu_wheels`` runs)::

    python3 benchmarks/gpu_prepare.py --install .gpu_wheels

installs them with ``pip install --no-index --find-links .gpu_wheels``, then HAI editable with ``--no-deps`` (its
build requirements from the same folder, so the ``package-dir`` mapping holds: ``hai.kernels`` is ``kernels/``), and
checks that ``hydra``, ``omegaconf`` and ``hai.kernels`` import from the checkout and from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / ".gpu_wheels"
# What the image lacks for HAI's module-level imports on the GPU path (hai.config.compose: hydra, omegaconf; their
# needs: antlr4 4.9.*, PyYAML, packaging), plus HAI's own build requirements (pyproject: setuptools, wheel).
RUNTIME = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "PyYAML", "packaging")
BUILD = ("setuptools", "wheel")
SDIST_ONLY = {"antlr4-python3-runtime": "4.9.3"}  # hydra-core 1.3 and omegaconf 2.3 need antlr4 4.9.*
FORBIDDEN = re.compile(r"^(torch|triton|nvidia[-_]|cuda[-_]|jax|cupy)", re.I)  # the image has these: never carry
CARRY_LIMIT = 64 * 2 ** 20  # what `run` carries beside the checkout, all carried paths together
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64")
MANIFEST = "MANIFEST.json"

__all__ = ["BUILD", "RUNTIME", "check_wheels", "install", "prepare"]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pin(name: str) -> str:
    """``name==version`` as installed in this environment (what CI tests HAI with), else the name alone."""
    if name in SDIST_ONLY:
        return f"{name}=={SDIST_ONLY[name]}"
    try:
        return f"{name}=={metadata.version(name)}"
    except metadata.PackageNotFoundError:
        return name


def _pip(args: list[str], log, timeout: float = 300, python: str = sys.executable) -> int:
    cmd = [python, "-m", "pip", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    except subprocess.TimeoutExpired:
        log.write(f"timed out after {timeout:.0f} s\n")
        return 124
    log.write(proc.stdout + proc.stderr)
    log.flush()
    return proc.returncode


def _wheel_tags(path: Path) -> tuple[str, str, str, str]:
    """(project, version, python tag, platform tag) of a wheel file name."""
    parts = path.name[:-4].split("-")
    return parts[0], parts[1], parts[-3], parts[-1]


def check_wheels(folder: Path, python_versions: tuple[str, ...] = ("3.12",)) -> list[str]:
    """What is wrong with a prepared folder (empty list: nothing): every requirement present, one version each,
    only py3-none-any or CPython manylinux x86_64 wheels for the target versions, nothing the image already has in
    a build of its own (torch, triton, nvidia), within the carry limit."""
    wheels = sorted(folder.glob("*.whl"))
    problems, versions = [], {}
    tags = {f"cp{v.replace('.', '')}" for v in python_versions}
    for w in wheels:
        project, version, py, plat = _wheel_tags(w)
        versions.setdefault(_norm(project), set()).add(version)
        if FORBIDDEN.match(project):
            problems.append(f"{w.name}: the image has its own {project}: do not carry it")
        if not ((py in ("py3", "py2.py3") and plat == "any") or (py in tags and "manylinux" in plat
                                                                and plat.endswith("x86_64"))):
            problems.append(f"{w.name}: not py3-none-any nor {'/'.join(sorted(tags))} manylinux x86_64")
    for name in RUNTIME + BUILD:
        if _norm(name) not in versions:
            problems.append(f"{name}: no wheel in {folder}")
    problems += [f"{p}: {len(v)} versions ({', '.join(sorted(v))}): keep one"
                 for p, v in versions.items() if len(v) > 1]
    size = sum(w.stat().st_size for w in wheels)
    if size > CARRY_LIMIT // 4:
        problems.append(f"{size / 2 ** 20:.1f} MiB of wheels: over a quarter of the 64 MiB carry limit")
    return problems


def prepare(folder: Path, python_versions: tuple[str, ...] = ("3.12",), log=sys.stderr) -> dict:
    """Download / build the wheels into ``folder``; returns the manifest (also written to folder/MANIFEST.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()  # one version of each: a stale one would stop the install there
    binary = [_pin(n) for n in RUNTIME + BUILD if n not in SDIST_ONLY]
    for v in python_versions:
        abi = f"cp{v.replace('.', '')}"
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        rc = _pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", v, "--implementation", "cp",
                   "--abi", abi, *plat, "-d", str(folder), *binary], log)
        if rc:
            raise SystemExit(f"pip download for Python {v} failed (rc {rc}): needs PyPI; see the log above")
    # the sdist builds with this environment's setuptools where it has one, else in pip's isolated build (PyPI)
    isolation = ["--no-build-isolation"] if _has_setuptools() else []
    rc = _pip(["wheel", "--no-deps", "--no-binary", ",".join(SDIST_ONLY), *isolation, "-w", str(folder),
               *(_pin(n) for n in SDIST_ONLY)], log)
    if rc:
        raise SystemExit(f"pip wheel {' '.join(SDIST_ONLY)} failed (rc {rc}): see the log above")
    wheels = sorted(folder.glob("*.whl"))
    manifest = {"python_versions": list(python_versions), "runtime": list(RUNTIME), "build": list(BUILD),
                "wheels": {w.name: w.stat().st_size for w in wheels},
                "bytes": sum(w.stat().st_size for w in wheels), "prepared": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    problems = check_wheels(folder, python_versions)
    if problems:
        raise SystemExit("prepared wheels are not usable:\n  " + "\n  ".join(problems))
    return manifest


def _has_setuptools() -> bool:
    try:
        return int(metadata.version("setuptools").split(".")[0]) >= 64
    except (metadata.PackageNotFoundError, ValueError):
        return False


def _import_check(python: str, cwd: Path, log) -> bool:
    code = ("import hydra, omegaconf, yaml, hai, hai.kernels, hai.config.compose; "
            "print('imports ok:', hai.kernels.__file__)")
    proc = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    log.write(f"$ (cd {cwd} && {python} -c {code!r})\n{proc.stdout}{proc.stderr}")
    return proc.returncode == 0 and (ROOT / "kernels").as_posix() in proc.stdout


def install(folder: Path, python: str = sys.executable, log=sys.stderr) -> int:
    """The GPU machine's install step: the runtime wheels, then HAI editable, all without an index; 0 when
    ``hai.kernels`` and ``hydra`` import from the checkout and from another directory."""
    t0 = time.time()
    offline = ["install", "--no-index", "--find-links", str(folder)]
    rc = _pip([*offline, *RUNTIME], log, timeout=120, python=python)
    print(f"install: runtime wheels {'ok' if rc == 0 else f'FAILED (rc {rc})'}", file=sys.stderr)
    # HAI itself: --no-deps (torch, triton are the image's; wandb is lazy); its build requirements (setuptools,
    # wheel) come from the same folder in an isolated build, else from the image's setuptools
    hai_rc = _pip([*offline, "--no-deps", "-e", str(ROOT)], log, timeout=120, python=python)
    how = "isolated build from the wheels"
    if hai_rc:
        hai_rc = _pip([*offline, "--no-deps", "--no-build-isolation", "-e", str(ROOT)], log, timeout=120,
                      python=python)
        how = "the image's setuptools (isolated build failed)"
    print(f"install: hai editable {'ok' if hai_rc == 0 else f'FAILED (rc {hai_rc})'} ({how})", file=sys.stderr)
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    ok = _import_check(python, ROOT, log) and _import_check(python, tmp, log)
    print(f"install: hydra, omegaconf, hai.kernels import {'ok' if ok else 'FAILED'} "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0 if ok and rc == 0 and hai_rc == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the wheels go (default .gpu_wheels)")
    ap.add_argument("--python-version", action="append", dest="versions",
                    help="target CPython X.Y (repeatable; default 3.12, the GPU image's)")
    ap.add_argument("--install", type=Path, metavar="DIR", help="install from DIR, offline (the GPU machine's step)")
    ap.add_argument("--log", type=Path, help="pip's output goes here (default: stderr)")
    args = ap.parse_args(argv)
    log = open(args.log, "a") if args.log else sys.stderr
    try:
        if args.install:
            return install(args.install.resolve(), log=log)
        manifest = prepare(args.dir.resolve(), tuple(args.versions or ("3.12",)), log=log)
    finally:
        if args.log:
            log.close()
    print(f"{len(manifest['wheels'])} wheels, {manifest['bytes'] / 2 ** 20:.2f} MiB in {args.dir}: "
          + ", ".join(manifest["wheels"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
