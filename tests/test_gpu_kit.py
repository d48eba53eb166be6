"""The GPU check kit (benchmarks/gpu_check.sh, gpu_check.py, gpu_prepare.py) works before the first GPU does.

- Its CPU code paths run end to end (--smoke): every kernel launcher gives its torch reference's bytes under the
  interpreter, the calibration table it writes is one ``hai plan calibration=PATH`` reads, and the two short
  training runs finish with a falling loss and a plan row beside them; a section that times out is recorded, the
  sections after it still run, and the JSON on disk is complete after every section; gpu_check.sh's outer timeout
  (SIGTERM) leaves the report written and no section process running.
- Its GPU-test section refuses a vacuous run: with CUDA present (mocked), zero tests run or any skipped is a failure
  (real pytest: the two gpu tests skip themselves without CUDA, which the kit must not pass).
- The wheels the preparation step downloads (needs PyPI, which CI has; ~3 MiB) install into a fresh venv with no
  index, through the kit's own install step, and make every HAI module import there, in a venv holding this
  environment's packages minus hydra-core, omegaconf, antlr4, PyYAML, packaging, setuptools, wheel, wandb and HAI.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_kit_{name}", BENCH / f"{name}.py")
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


kit, prep = _load("gpu_check"), _load("gpu_prepare")


# ---------------------------------------------------------------------------------------------- smoke + timeout
def _run_smoke_watching(out: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run the kit (aot forced to time out after 2 s) and keep every distinct JSON seen on disk while it runs."""
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--out", str(out), "--timeouts", "aot=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, last = [], None
    while proc.poll() is None:
        if out.exists() and out.read_text() != last:
            last = out.read_text()
            seen.append(json.loads(last))  # never half a file: written to a temporary name, then renamed
        time.sleep(0.1)
    stdout, stderr = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), seen


def test_smoke_on_cpu_with_a_section_timeout(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc, seen = _run_smoke_watching(out)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 1, log  # the forced aot timeout makes the verdict "failed"
    report = json.loads(out.read_text())
    secs = report["sections"]
    assert report["kit"]["verdict"] == "failed" and report["kit"]["failed"] == ["aot"], log
    assert {n: secs[n]["status"] for n in secs} == {
        "env": "ok", "kernels": "ok", "gemm": "ok", "attention": "ok", "calibration": "ok", "aot": "timeout",
        "train": "ok", "gpu_tests": "skipped", "parity": "skipped"}, log
    assert secs["aot"]["timeout_s"] == 2 and secs["aot"]["seconds"] < 10 and secs["aot"]["returncode"] < 0
    assert secs["gpu_tests"]["reason"].startswith("needs CUDA") and secs["parity"]["reason"].startswith("needs CUDA")
    # the report on disk was complete after the timeout, before the section after it (train) had finished
    assert any(s["sections"].get("aot", {}).get("status") == "timeout" and "train" not in s["sections"] for s in seen)
    kernels = {k["kernel"]: k for k in secs["kernels"]["result"]["rows"]}
    assert set(kernels) == {"quant_1x128", "quant_128x1", "quant_128x128", "fp8_gemm", "fp8_grouped_gemm",
                            "fp8_k_grouped_gemm"}
    for k in kernels.values():
        assert k.get("bytes_equal", 1.0) == 1.0 and k.get("scale_rel_err", 0.0) == 0.0 and k.get("rel_err", 0) < 1e-6
    att = secs["attention"]["result"]
    assert max(att["rel_err"].values()) < 1e-4 and att["sdpa_tflops"] > 0
    train = secs["train"]["result"]
    assert [r["precision"] for r in train["runs"]] == ["bf16", "fp8"]
    for r in train["runs"]:
        assert r["status"] == "ok" and r["steps"] == 3 and r["final_loss"] < r["first_loss"], r
        assert r["plan"]["tokens_per_s"] > 0 and r["plan_measured"]["tokens_per_s"] > 0
    assert train["calibration_loaded"] == "cpu_smoke"  # hai plan calibration=PATH read the table the kit wrote
    _check_smoke_calibration(out, report)
    assert "verdict failed (failed: aot)" in proc.stdout and "fp8   3 steps" in proc.stdout


def test_outer_timeout_writes_the_report_and_kills_the_section(tmp_path):
    """gpu_check.sh's `timeout` sends SIGTERM: the section in flight is killed (its whole process group) and
    recorded, what finished before stays in the report."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, str(BENCH / "gpu_check.py"), "--smoke", "--only", "env,train",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and "env" not in (json.loads(out.read_text()) if out.exists() else {}).get(
            "sections", {}):
        time.sleep(0.1)
    time.sleep(1.0)  # the train section is in flight
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 124, stdout[-2000:] + stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["sections"]["env"]["status"] == "ok" and report["kit"]["stopped"] == "SIGTERM"
    assert report["sections"]["train"] == {"status": "timeout",
                                           "reason": "the kit was stopped (SIGTERM) in this section"}
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-o", "stat=,args=", "-s", str(proc.pid)], capture_output=True, text=True)
    alive = [line for line in ps.stdout.splitlines() if not line.lstrip().startswith("Z")]  # zombies: killed
    assert alive == [], alive  # no section process (or its training run) left running in the kit's session


def _check_smoke_calibration(out: Path, report: dict) -> None:
    from hai.plan.calibration import load_calibration

    rows = report["sections"]["gemm"]["result"]["rows"]
    for path in (out, out.with_name("calibration.json")):  # the report is a table too, and the table alone
        cal = load_calibration(str(path))
        assert cal.name == "cpu_smoke" and "NOT a calibration" in cal.sources["gemm_fp8_tflops"]
        for r in rows:
            if r["kind"] in ("dense", "grouped"):
                got = cal.fp8_gemm_efficiency(r["kind"], r["n"], r["k"]) * cal.nominal["peak_tflops_fp8"]
                assert got == pytest.approx(r["fp8_hai"], rel=1e-3), r


# ------------------------------------------------------------------------------------------------ calibration
def _rows(fp8: dict, bf16: float = 500.0) -> list[dict]:
    return [{"kind": kind, "n": n, "k": k, "fp8_hai": t, "bf16_torch": bf16} for (kind, n, k), t in fp8.items()]


def test_calibration_from_measurements_reads_back(tmp_path):
    from hai.plan.calibration import load_calibration

    env = {"gpu": "NVIDIA H100 80GB HBM3", "sms": 132, "torch": "2.11", "triton": "3.6"}
    fp8 = {("dense", 7168, 2048): 1000.0, ("dense", 2112, 7168): 800.0, ("grouped", 4096, 7168): 900.0,
           ("wgrad", 7168, 2048): 600.0, ("wgrad", 2112, 7168): 700.0}
    table = kit.build_calibration(env, _rows(fp8), {"status": "ok", "sdpa_tflops": 450.0})
    (tmp_path / "c.json").write_text(json.dumps(table))
    cal = load_calibration(str(tmp_path / "c.json"))
    assert cal.name == "nvidia_h100_80gb_hbm3_measured" and cal.nominal["peak_tflops_fp8"] == 1979.0
    assert cal.fp8_gemm_efficiency("dense", 7168, 2048) == pytest.approx(1000 / 1979)
    assert cal.fp8_gemm_efficiency("dense", 2112, 7168) == pytest.approx(800 / 1979)
    assert cal.fp8_gemm_efficiency("grouped", 7168, 2048) == pytest.approx(900 / 1979)  # the only grouped entry
    assert cal.wgrad_tflops == 650.0 and table["gemm_fp8_tflops"]["wgrad"]["range"] == [600.0, 700.0]
    assert cal.gemm_bf16_efficiency == pytest.approx(500 / 989.5, rel=1e-3)
    assert cal.attention_efficiency() == pytest.approx(450 / 989.5)
    assert cal.sms_total == 132 and cal.sms_comm == 20
    # what one GPU cannot measure, or a section that failed, is the published table's, and the sources say so
    pub = json.loads(kit.PUBLISHED.read_text())
    assert table["all_to_all_gbps"] == pub["all_to_all_gbps"]
    failed = kit.build_calibration({"gpu": "Some GPU"}, _rows({("dense", 7168, 2048): 900.0}),
                                   {"status": "failed", "sdpa_tflops": 1.0})
    assert failed["gemm_fp8_tflops"]["grouped"] == pub["gemm_fp8_tflops"]["grouped"]
    assert failed["attention_tflops_bf16"] == pub["attention_tflops_bf16"]
    assert "published H800 (not measured here)" in failed["sources"]["gemm_fp8_tflops"]
    assert "unknown GPU" in failed["sources"]["nominal"]


def test_gpu_layouts_compose():
    """The GPU-only sections' training layouts are valid configs (checked here, not on the first lent GPU)."""
    from hai.config.compose import compose

    train = kit._train_layout(SimpleNamespace(smoke=False))
    assert "model.attention=sdpa" in train  # the fused attention exists in this checkout
    for precision in ("fp32", "bf16", "fp8"):
        for layout in (train, kit.parity_layout()):
            cfg = compose([*layout, f"model.precision={precision}", "out_dir=/nonexistent"])
            assert cfg.cluster.device == "cuda" and cfg.model.precision == precision


# ------------------------------------------------------------------------------------------------ gpu tests
def _fake_stream(tests: int, skipped: int, failures: int = 0, rc: int = 0):
    calls = []

    def stream(cmd, env):
        junit = Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1])
        cases = "".join(f'<testcase name="t{i}">' + ('<skipped message="needs CUDA"/>' if i < skipped else "")
                        + "</testcase>" for i in range(tests))
        junit.write_text(f'<testsuites><testsuite tests="{tests}" skipped="{skipped}" failures="{failures}" '
                         f'errors="0">{cases}</testsuite></testsuites>')
        calls.append((cmd, env))
        return rc, [f"{tests - skipped} passed, {skipped} skipped"]

    return stream, calls


def test_gpu_tests_section_refuses_a_vacuous_run(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the old kit's setting, under which the gpu test skips itself
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a CUDA device, as the kit sees it
    ctx = SimpleNamespace(work=tmp_path, timeout=60)
    cases = {(0, 0, 0, 5): "vacuous", (2, 2, 0, 0): "vacuous", (2, 1, 0, 0): "1 gpu tests skipped",
             (2, 0, 1, 1): "1 failed", (2, 0, 0, 0): "2 gpu tests passed"}
    for (tests, skipped, failures, rc), reason in cases.items():
        stream, calls = _fake_stream(tests, skipped, failures, rc)
        res = kit.section_gpu_tests(ctx, stream=stream)
        assert reason in res["reason"] and res["status"] == ("ok" if reason.endswith("passed") else "failed"), res
        cmd, env = calls[0]
        assert "TRITON_INTERPRET" not in env and cmd[cmd.index("-m", 2) + 1] == "gpu"
        assert {"tests/test_fp8_kernels.py", "tests/test_attention.py"} <= set(cmd)
    # real pytest on this CPU machine: every gpu test skips itself ("N skipped"), which must not pass on CUDA
    res = kit.section_gpu_tests(ctx)
    assert res["status"] == "failed" and res["reason"].startswith("vacuous"), res
    assert res["counts"]["tests"] >= 2 and res["counts"]["skipped"] == res["counts"]["tests"]
    assert kit.judge_gpu_tests({"tests": 2, "skipped": 2}, 0, cuda=False) == ("skipped", "needs CUDA")


def test_aot_section_applies_the_aot_checks(tmp_path, monkeypatch):
    row = {"kernel": "_fp8_gemm_kernel", "arch": "sm_90", "registers": 168, "spill_stores": 0, "spill_loads": 0,
           "smem": 99_000, "num_warps": 8, "num_stages": 3, "mma": ["wgmma.mma_async.sync.aligned.f32.e4m3.e4m3"],
           "mma_e4m3": True, "async_copies": {"a": 3, "b": 3}, "fma": 0}
    for copies, status in (({"a": 3, "b": 3}, None), ({"a": 3}, "failed")):
        def stream(cmd, env, copies=copies):
            assert cmd[cmd.index("--arch") + 1] == "90" and "TRITON_INTERPRET" not in env
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps([{**row, "async_copies": copies}]))
            return 0, ["1 variants compiled; ..."]

        monkeypatch.setattr(kit, "_stream", stream)
        res = kit.section_aot(SimpleNamespace(device="cpu", work=tmp_path))
        assert res.get("status") == status and res["summary"].startswith("1 variants compiled"), res
    assert res["reason"] == "failed: both_operands_async"


# ------------------------------------------------------------------------------------- the device command line
def test_device_command_and_budgets_fit():
    sh = (BENCH / "gpu_check.sh").read_text()
    m = re.search(r"the one command line \((\d+) characters.*\n#\s+(.+)\n", sh)
    assert m, "gpu_check.sh's header names the one command line"
    command = m.group(2).strip()
    assert len(command) == int(m.group(1)) <= 2000 and "--wheels .gpu_wheels" in command
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu_wheels/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, ".gpu_wheels/ must be ignored (it travels as carry=['.gpu_wheels'])"
    total, kit_budget = (int(re.search(rf"^{k}=(\d+)", sh, re.M).group(1)) for k in ("TOTAL", "KIT_BUDGET"))
    assert total < 480 and kit_budget == kit.DEFAULT_BUDGET
    # every section's cap fits the kit's budget together (parity takes only what is left, at least its min_s)
    assert sum(s.cap_s for s in kit.SECTIONS if s.name != "parity") <= kit.DEFAULT_BUDGET


# --------------------------------------------------------------------------------------- wheels and the install
def test_check_wheels_flags_what_would_fail_there(tmp_path):
    names = ["hydra_core-1.3.8-py3-none-any.whl", "omegaconf-2.3.1-py3-none-any.whl",
             "antlr4_python3_runtime-4.9.3-py3-none-any.whl", "packaging-26.4-py3-none-any.whl",
             "pyyaml-6.0.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
             "setuptools-84.2.1-py3-none-any.whl", "wheel-0.48.0-py3-none-any.whl"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    assert prep.check_wheels(tmp_path) == []
    (tmp_path / names[2]).unlink()  # antlr4 missing: hydra's install would fail offline
    (tmp_path / "pyyaml-6.0.3-cp311-cp311-manylinux2014_x86_64.whl").write_bytes(b"")  # wrong python, 2 versions
    (tmp_path / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    problems = "\n".join(prep.check_wheels(tmp_path))
    for needle in ("antlr4-python3-runtime: no wheel", "cp311-cp311", "pyyaml: 2 versions", "the image has its own"):
        assert needle in problems, problems


_NOT_IN_IMAGE = re.compile(r"^(hydra|omegaconf|antlr4|yaml|_yaml|pyyaml|packaging|setuptools|pkg_resources|"
                           r"_distutils_hack|wheel|wandb|hai|__editable__)([-_.].*)?$", re.I)


def _fresh_venv(tmp: Path) -> str:
    """A venv holding this environment's packages (symlinked, as the image holds its own) except what the wheels
    bring, wandb and HAI: the GPU image's situation."""
    image = tmp / "image"
    image.mkdir()
    for site in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        for entry in Path(site).iterdir():
            if not (_NOT_IN_IMAGE.match(entry.name) or entry.suffix == ".pth" or (image / entry.name).exists()):
                (image / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    (next((tmp / "venv" / "lib").glob("python3*")) / "site-packages" / "image.pth").write_text(f"{image}\n")
    return str(tmp / "venv" / "bin" / "python")


IMPORT_ALL = """
import importlib, pkgutil, sys
from hai.config.compose import compose
names = []
for top in ("hai", "hai.parallel", "hai.pipeline", "hai.kernels", "hai.launch"):
    names += [top] + [m.name for m in pkgutil.walk_packages(importlib.import_module(top).__path__, top + ".")]
for name in names:
    importlib.import_module(name)
cfg = compose(["model=tiny", "cluster=cpu1", "parallel=single", "train=test"])
print(len(names), "modules;", cfg.model.name, "; wandb imported:", "wandb" in sys.modules)
"""


def test_prepared_wheels_install_offline_in_a_fresh_venv(tmp_path):
    """Needs PyPI for the preparation (CI has it; ~3 MiB, pip's cache makes reruns local)."""
    wheels, here = tmp_path / "wheels", f"{sys.version_info.major}.{sys.version_info.minor}"
    prep_proc = subprocess.run([sys.executable, str(BENCH / "gpu_prepare.py"), "--dir", str(wheels),
                                "--python-version", "3.12", "--python-version", here], capture_output=True, text=True,
                               timeout=300)
    assert prep_proc.returncode == 0, prep_proc.stdout[-2000:] + prep_proc.stderr[-4000:]
    manifest = json.loads((wheels / "MANIFEST.json").read_text())
    assert manifest["bytes"] < 8 * 2 ** 20 and any(re.match(r"pyyaml-.*-cp312-cp312-manylinux", w, re.I)
                                                   for w in manifest["wheels"])
    assert prep.check_wheels(wheels, ("3.12", here)) == []
    py = _fresh_venv(tmp_path)
    before = subprocess.run([py, "-c", "import torch\nimport hydra"], capture_output=True, text=True)
    assert "No module named 'hydra'" in before.stderr, before.stderr[-2000:]  # the stand-in image lacks it
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHON=py)  # no index, no find-links but the wheels: as there
    out = tmp_path / "out"
    inst = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--wheels", str(wheels), "--install-only", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    log = (out / "install.log").read_text() if (out / "install.log").exists() else ""
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:] + log[-4000:]
    assert "hai editable ok (isolated build from the wheels)" in inst.stdout and "--no-index" in log
    done = subprocess.run([py, "-c", IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "wandb imported: False" in done.stdout and int(done.stdout.split()[0]) > 50, done.stdout
