"""A private, single-machine Slurm cluster for tests: munged + slurmctld + two slurmd ("n1", "n2") on localhost.

Everything lives under one directory (config, keys, sockets, state, spool, logs, pid files) and the daemons listen
on free ports, so nothing touches the machine's own Slurm or munge. Daemons are stopped by the PIDs in their pid
files, never by name. Needs root (slurmd runs jobs as their owner) and Debian's ``slurm-wlm`` + ``munge``
(``.ci/install_slurm.sh`` installs them).

    with SlurmCluster(tmp_dir) as cluster:
        env = cluster.env()                      # SLURM_CONF and friends, for sbatch/squeue/scontrol/`hai launch`
        state = cluster.wait(job_id, timeout=120)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "unavailable_reason", "install_slurm"]

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "sinfo", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}
REPO = Path(__file__).resolve().parent.parent


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                      None)


def unavailable_reason() -> str | None:
    """Why a private Slurm cannot run here (None when it can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "Slurm needs a POSIX machine"
    if os.geteuid() != 0:
        return "the private Slurm cluster needs root (slurmd starts job steps as their owner)"
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return (f"Slurm/munge binaries not found ({', '.join(missing)}): run `bash .ci/install_slurm.sh` "
                f"(apt-get install slurm-wlm munge)")
    return None


def install_slurm() -> None:
    """Best effort: install slurm-wlm + munge with the CI script when they are missing and apt-get exists."""
    if unavailable_reason() is None or os.geteuid() != 0 or shutil.which("apt-get") is None:
        return
    subprocess.run(["bash", str(REPO / ".ci" / "install_slurm.sh")], check=False, timeout=600,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    def __init__(self, root: str | os.PathLike, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2):
        self.root = Path(root).resolve()
        self.nodes, self.cpus = nodes, cpus
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self._pid_files: list[Path] = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 30.0) -> None:
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self._write_conf()
        self._daemon([_which("slurmctld"), "-f", str(self.conf)], self.root / "run" / "slurmctld.pid")
        for n in self.nodes:
            (self.root / "spool" / n).mkdir(exist_ok=True)
            self._daemon([_which("slurmd"), "-f", str(self.conf), "-N", n], self.root / "run" / f"slurmd-{n}.pid")
        self._wait_idle(timeout)

    def stop(self) -> None:
        """SIGTERM each daemon we started (by its pid file), then SIGKILL what is left."""
        pids = [pid for pid in (self._read_pid(p) for p in reversed(self._pid_files)) if pid]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        self._pid_files.clear()

    # ------------------------------------------------------------------ jobs
    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        res = subprocess.run(list(args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}\n{self.logs()}")
        return res.stdout

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", str(job_id), "-o", check=False)
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float = 120.0, poll: float = 0.5) -> str:
        """Poll until the job reaches a terminal state; returns it ("TIMEOUT_WAITING" if it did not in time)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in TERMINAL_STATES:
                return state
            time.sleep(poll)
        self.run("scancel", str(job_id), check=False)
        return "TIMEOUT_WAITING"

    def logs(self, tail: int = 30) -> str:
        out = []
        for p in sorted((self.root / "log").glob("*.log")):
            lines = p.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # ------------------------------------------------------------------ internals
    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        pid = self.root / "munge" / "munged.pid"
        self._daemon([_which("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                      f"--pid-file={pid}", f"--log-file={self.root / 'log' / 'munged.log'}",
                      f"--seed-file={self.root / 'munge' / 'munged.seed'}"], pid)

    def _write_conf(self) -> None:
        ctld, *node_ports = free_ports(1 + len(self.nodes))
        r = self.root
        lines = [
            "ClusterName=haitest", "SlurmctldHost=localhost", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
            "ReturnToService=2", "SchedulerType=sched/backfill",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "InactiveLimit=0", "MinJobAge=300", "KillWait=5", "Waittime=0",
        ]
        for n, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                         f"RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, cmd: list, pid_file: Path, timeout: float = 15.0) -> None:
        self._pid_files.append(pid_file)
        res = subprocess.run([str(c) for c in cmd], env=self.env(), capture_output=True, text=True, timeout=timeout)
        if res.returncode:
            raise RuntimeError(f"{cmd[0]} exited {res.returncode}: {res.stderr.strip()}\n{self.logs()}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._read_pid(pid_file):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{cmd[0]} wrote no pid file {pid_file}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"slurm nodes not idle after {timeout}s: {out!r}\n{self.logs()}")

    @staticmethod
    def _read_pid(path: Path) -> int | None:
        try:
            pid = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A private Slurm cluster for the module's tests (skipped, with the reason, where Slurm cannot run)."""
    install_slurm()
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c
