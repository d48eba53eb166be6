"""Hang reports: a collective that does not complete within ``train.collective_timeout_s`` ends the job with a dump.

Every rank runs a watchdog thread (``HangWatch``). Collectives are recorded by torch's flight recorder (c10d's
FlightRecorder, on for gloo and NCCL once ``TORCH_FR_BUFFER_SIZE`` is set before the process group is created; NCCL's
is the same recorder): op, process group, sizes, dtypes, sequence number, enqueue time, completion. The watchdog
polls the recorder's pending entries; when the oldest is older than the timeout, it posts the collective to the
process group's store. Every rank's watchdog sees that key (also a rank stuck in compute, which is in no collective
at all) and writes ``OUT_DIR/hang/rank_K.txt``:

- the timed-out collective and whether this rank issued it,
- the Python stack of every thread (``faulthandler``),
- its last ``N`` collectives from the flight recorder (oldest first),

and posts its progress (the last sequence number it issued on each group). The rank that detected the timeout
collects them and names the ranks that did not arrive (issued fewer collectives on that group, or did not answer),
in one line printed first and written to ``OUT_DIR/hang/summary.txt`` (``hai train`` prints it again when the job has
ended). Then every rank exits with :data:`HANG_EXIT_CODE`; the process group's own timeout is set later
(:func:`pg_timeout_s`), as a backstop only.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket
import sys
import threading
import time

import torch.distributed as dist

__all__ = ["HangWatch", "enable_flight_recorder", "pg_timeout_s", "read_summary", "HANG_EXIT_CODE", "LAST_N"]

HANG_EXIT_CODE = 3
LAST_N = 64  # collectives per rank in its report
_BUFFER = 2000  # flight recorder entries (a ring: the newest are kept)
_PREFIX = "hai_hang/"
_ANSWER_S = 10.0  # how long the reporter waits for the other ranks' reports


def enable_flight_recorder(entries: int = _BUFFER) -> None:
    """Record collectives (torch's flight recorder): call before the process group is created."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(entries))


def pg_timeout_s(collective_timeout_s: float) -> float:
    """The process group's own timeout: later than the watchdog's, so the dump happens first."""
    return collective_timeout_s + max(60.0, 0.5 * collective_timeout_s)


def _dump_fr(only_active: bool) -> dict:
    """The flight recorder's JSON (NCCL's recorder when NCCL is the default backend)."""
    import torch._C._distributed_c10d as c10d

    fn = None
    if dist.get_backend() == "nccl":
        fn = getattr(c10d, "_dump_nccl_trace_json", None)
    fn = fn or getattr(c10d, "_dump_fr_trace_json", None)
    if fn is None:
        return {"entries": []}
    raw = fn(True, only_active)
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _groups() -> dict[str, tuple[str, list[int]]]:
    """Process group name -> (description, global ranks)."""
    out = {}
    try:
        names = dict(dist.distributed_c10d._world.pg_names)
    except AttributeError:
        return out
    for pg, name in names.items():
        try:
            out[str(name)] = (getattr(pg, "group_desc", "") or "", dist.get_process_group_ranks(pg))
        except (RuntimeError, ValueError):
            continue
    return out


def _describe(e: dict, groups: dict) -> str:
    name, desc = (e.get("process_group") or ["?", ""])[:2]
    ranks = groups.get(str(name), ("", None))[1]
    kind = "p2p" if e.get("is_p2p") else "collective"
    seq = e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")
    return (f"{e.get('profiling_name', '?')} {kind} #{seq} on group {name} ({desc or 'no description'}, ranks "
            f"{ranks}) input sizes {e.get('input_sizes')} {e.get('input_dtypes')}, output sizes "
            f"{e.get('output_sizes')}")


def _progress(entries: list[dict]) -> dict[str, dict[str, int]]:
    """Per group name: the highest collective and p2p sequence numbers this rank issued (in the recorder's ring)."""
    last: dict[str, dict[str, int]] = {}
    for e in entries:
        name = str((e.get("process_group") or ["?"])[0])
        d = last.setdefault(name, {"coll": 0, "p2p": 0})
        key, seq = ("p2p", e.get("p2p_seq_id", 0)) if e.get("is_p2p") else ("coll", e.get("collective_seq_id", 0))
        d[key] = max(d[key], int(seq or 0))
    return last


def _ranges(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks) if ranks else "none"


class HangWatch:
    """The watchdog thread of one rank (``start``/``stop``); see the module docstring."""

    def __init__(self, out_dir: str, timeout_s: float, store=None, poll_s: float | None = None):
        self.out_dir, self.timeout_s = out_dir, timeout_s
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.poll_s = poll_s if poll_s is not None else min(5.0, max(0.2, timeout_s / 10))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hai-hang-watch", daemon=True)
        self.groups = _groups()

    def start(self) -> "HangWatch":
        self.groups = _groups()  # every group exists by now (built with the meshes)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ detection
    def _oldest_pending(self) -> dict | None:
        pending = [e for e in _dump_fr(only_active=True).get("entries", []) if not e.get("retired")]
        return min(pending, key=lambda e: e.get("time_created_ns", 0)) if pending else None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                if self.store.check([_PREFIX + "trigger"]):
                    return self._respond(json.loads(self.store.get(_PREFIX + "trigger")))
                oldest = self._oldest_pending()
                age = None if oldest is None else time.time() - oldest["time_created_ns"] / 1e9
                if age is not None and age > self.timeout_s:
                    mine = json.dumps({"rank": self.rank, "entry": oldest, "age_s": age,
                                       "text": _describe(oldest, self.groups)})
                    posted = self.store.compare_set(_PREFIX + "trigger", "", mine)
                    posted = posted.decode() if isinstance(posted, bytes) else posted
                    return self._respond(json.loads(posted))
            except Exception as e:  # noqa: BLE001 - the store may be gone when the job ends: stop watching
                if not self._stop.is_set():
                    print(f"hai train: rank {self.rank}: hang watchdog stopped ({type(e).__name__}: {e})",
                          file=sys.stderr, flush=True)
                return None

    # ------------------------------------------------------------------ report
    def _respond(self, trigger: dict) -> None:
        """Write this rank's report, post its progress, (the detecting rank:) name the late ranks; then exit, whatever
        fails on the way (the store goes away when the rank hosting it exits first)."""
        try:
            full = sorted(_dump_fr(only_active=False).get("entries", []), key=lambda e: e.get("record_id", 0))
            progress = _progress(full)
            path = self._write(trigger, full, progress)
            self.store.set(f"{_PREFIX}status/{self.rank}", json.dumps({"progress": progress, "path": path}))
            if trigger["rank"] == self.rank:
                self._summarize(trigger)
                self.store.set(_PREFIX + "done", "1")
            else:
                self._wait_for(_PREFIX + "done", _ANSWER_S + 5)
        except Exception as e:  # noqa: BLE001 - report and end the process all the same
            print(f"hai train: rank {self.rank}: hang report incomplete ({type(e).__name__}: {e})", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    def _wait_for(self, key: str, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.store.check([key]):
                return True
            time.sleep(0.05)
        return False

    def _write(self, trigger: dict, entries: list[dict], progress: dict) -> str:
        hang_dir = os.path.join(self.out_dir, "hang")
        os.makedirs(hang_dir, exist_ok=True)
        path = os.path.join(hang_dir, f"rank_{self.rank}.txt")
        e = trigger["entry"]
        name = str((e.get("process_group") or ["?"])[0])
        kind = "p2p" if e.get("is_p2p") else "coll"
        seq = e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")
        issued = progress.get(name, {}).get(kind, 0)
        with open(path, "w") as f:
            f.write(f"hai hang report: rank {self.rank} of {self.world} on {socket.gethostname()} "
                    f"(pid {os.getpid()}), {datetime.datetime.now().isoformat(timespec='seconds')}\n")
            f.write(f"timed out: {trigger['text']}: pending {trigger['age_s']:.1f} s on rank {trigger['rank']} "
                    f"(train.collective_timeout_s={self.timeout_s:g})\n")
            f.write(f"this rank: {'issued it' if issued >= int(seq or 0) else 'has NOT issued it'} (its last on "
                    f"group {name}: #{issued})\n\n== Python stacks (faulthandler, every thread) ==\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.write(f"\n== last {LAST_N} collectives of this rank (flight recorder, oldest first) ==\n")
            now = time.time()
            for x in entries[-LAST_N:]:
                state = "completed" if x.get("retired") else "PENDING"
                f.write(f"{state:9s} {now - x.get('time_created_ns', 0) / 1e9:8.2f} s ago  {_describe(x, self.groups)}"
                        f"\n")
        return path

    def _summarize(self, trigger: dict) -> None:
        e = trigger["entry"]
        name = str((e.get("process_group") or ["?"])[0])
        kind = "p2p" if e.get("is_p2p") else "coll"
        seq = int((e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")) or 0)
        ranks = self.groups.get(name, ("", list(range(self.world))))[1]
        keys = [f"{_PREFIX}status/{r}" for r in ranks]
        deadline = time.time() + _ANSWER_S
        while time.time() < deadline and not self.store.check(keys):
            time.sleep(0.05)
        behind, silent = [], []
        for r, key in zip(ranks, keys):
            if not self.store.check([key]):
                silent.append(r)
            elif json.loads(self.store.get(key))["progress"].get(name, {}).get(kind, 0) < seq:
                behind.append(r)
        late = sorted(behind + silent)
        hang_dir = os.path.join(self.out_dir, "hang")
        line = (f"collective timeout: rank(s) {_ranges(late)} did not arrive at {trigger['text']} within "
                f"train.collective_timeout_s={self.timeout_s:g} (rank {self.rank} waited {trigger['age_s']:.1f} s)"
                + (f"; rank(s) {_ranges(silent)} did not answer" if silent else "")
                + f"; stacks and last collectives of every rank: {hang_dir}/rank_K.txt")
        with open(os.path.join(hang_dir, "summary.txt"), "w") as f:
            f.write(line + "\n")
        print(f"hai train: {line}", file=sys.stderr, flush=True)


def read_summary(out_dir: str, since: float = 0.0) -> str | None:
    """The first line of ``OUT_DIR/hang/summary.txt`` if it was written after ``since`` (time.time())."""
    path = os.path.join(out_dir, "hang", "summary.txt")
    try:
        if os.path.getmtime(path) < since:
            return None
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None
