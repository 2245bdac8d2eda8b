"""Training runs: launch train.py as a subprocess, watch it, and make sure it can never wedge the machine.

One run at a time per device, enforced across processes with an flock whose file descriptor the training process
inherits: the lock lives exactly as long as the run's processes, so a server killed with SIGKILL leaves the lock to
its orphan, and a dead holder frees it by itself. A daemon thread tails the log for progress, enforces the hard
timeout, and on exit kills every process the run left behind, reads the metric from the result file only, checks the
pins and appends the final ledger record. Process bookkeeping uses /proc on Linux; elsewhere it is best effort
(the process group is still killed).
"""

import collections
import fcntl
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio

from server.errors import WorkspaceError
from server.gitops import TRAIN
from server.ledger import now_iso
from server.workspace import PREPARE, prepare_sha256, training_env

# hard timeout = 2 x budget (upstream's rule) + this much for interpreter start, compilation and the final evaluation
TIMEOUT_ALLOWANCE_SECONDS = 120
KILL_GRACE_SECONDS = 5.0  # after SIGTERM, how long the process group gets to exit before SIGKILL
POLL_SECONDS = 0.2  # monitor tick: reading new log bytes, checking exit, timeout, cancellation
TRACK_SECONDS = 1.0  # how often the monitor records the run's descendants (they may escape the group later)
PROGRESS_SECONDS = 2.0  # on_progress cadence in wait()
TAIL_LINES = 40  # log lines kept in the ledger record of a run that did not succeed
MAX_LINE_CHARS = 1000  # a single log line is cut to this in the tail (a printed tensor can be megabytes)
MAX_LOG_BYTES = 256 * 2**20  # a run printing more than this is killed: it would fill the disk overnight
MAX_READ_BYTES = 2**20  # per tick; if the log grew by more, skip ahead (only recent lines matter)
PINNED_CONSTANTS = ("max_seq_len", "eval_tokens", "vocab_size")

PROGRESS_LINE = re.compile(r"^\s*step\s+(\d+)")
PERCENT = re.compile(r"\(\s*([-+\d.eE]+)\s*%\s*\)")
LOSS = re.compile(r"loss:\s*([-+\w.]+)")
REMAINING = re.compile(r"remaining:\s*([-+\d.eE]+)\s*s")
SUMMARY_LINE = re.compile(r"^([A-Za-z_]\w*):\s+(.*?)\s*$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
FRAME_LINE = re.compile(r'^\s*File "([^"]+)", line (\d+)')
FAIL_LINE = re.compile(r"^FAIL\b")


def parse_number(text: str):
    """Summary values: int or float where numeric, the text otherwise ('cuda', 'climbmix')."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text  # NaN is not JSON: keep "nan" as text
    return text


# ---------------------------------------------------------------------------------------------------------------
# processes, through /proc (Linux). Every pid we signal is re-checked against its start time: pids get reused.


def proc_stat(pid: int) -> dict | None:
    """ppid, pgrp, session, start ticks (field 22) and state of a process, or None if it is gone / no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    fields = data[data.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return {"state": fields[0], "ppid": int(fields[1]), "pgrp": int(fields[2]), "session": int(fields[3]),
            "start_ticks": int(fields[19])}


def start_ticks(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat["start_ticks"] if stat else None


def is_alive(pid: int | None, ticks: int | None) -> bool:
    """Running (not a zombie) and, where /proc tells, the very process we saw earlier."""
    if not pid:
        return False
    stat = proc_stat(pid)
    if stat is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (macOS): existence is all we can know
            os.kill(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    return stat["state"] not in ("Z", "X") and (ticks is None or stat["start_ticks"] == ticks)


def all_processes() -> dict[int, dict]:
    procs = {}
    try:
        names = os.listdir("/proc")
    except FileNotFoundError:
        return procs
    for name in names:
        if name.isdigit() and (stat := proc_stat(int(name))) is not None and stat["state"] not in ("Z", "X"):
            procs[int(name)] = stat
    return procs


def run_processes(root: int, known: dict[int, int]) -> dict[int, int]:
    """{pid: start_ticks} of the run's live processes: its session/group (root is the leader of both) and every
    descendant of root or of an already known process (a child that called setsid itself left the group)."""
    procs = all_processes()
    found = {pid: s["start_ticks"] for pid, s in procs.items() if root in (s["pgrp"], s["session"])}
    found.update({pid: t for pid, t in known.items() if pid in procs and procs[pid]["start_ticks"] == t})
    children = collections.defaultdict(list)
    for pid, s in procs.items():
        children[s["ppid"]].append(pid)
    stack = [root, *found]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found[child] = procs[child]["start_ticks"]
                stack.append(child)
    found.pop(os.getpid(), None)
    return found


def processes_with_env(entry: str) -> dict[int, int]:
    """{pid: start_ticks} of processes started with this exact environment entry: the run's unique result-file
    path is inherited by everything train.py spawns, even by children that left the process group and whose
    parent has exited (so the ppid chain is gone). Catches orphans after a server restart too."""
    needle = entry.encode() + b"\0"
    found = {}
    for pid, stat in all_processes().items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # another user's process, or gone
            continue
        if (environ.startswith(needle) or b"\0" + needle in environ) and pid != os.getpid():
            found[pid] = stat["start_ticks"]
    return found


def signal_processes(pgid: int | None, procs: dict[int, int], sig: int) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, ticks in procs.items():
        if is_alive(pid, ticks):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def wait_gone(procs: dict[int, int], timeout: float) -> dict[int, int]:
    """Wait until these processes are gone (zombies count as gone); returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid: t for pid, t in procs.items() if is_alive(pid, t)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_processes(pgid: int | None, procs: dict[int, int], grace: float) -> dict[int, int]:
    """SIGTERM, then SIGKILL what is left after `grace` seconds. Returns the processes that were alive."""
    alive = {pid: t for pid, t in procs.items() if is_alive(pid, t)}
    if grace > 0:
        signal_processes(pgid, alive, signal.SIGTERM)
        wait_gone(alive, grace)
    signal_processes(pgid, alive, signal.SIGKILL)
    wait_gone(alive, 2.0)
    return alive


# ---------------------------------------------------------------------------------------------------------------
# log reading


def error_line(lines: list[str]) -> str | None:
    """The line of the log that best says why a run failed: train.py's own FAIL message, else the exception
    that ended it (SyntaxError, ModuleNotFoundError, OutOfMemoryError, ...) with where in train.py it was raised,
    else an out-of-memory message, else the last thing printed."""
    stripped = [line.strip() for line in lines]
    for line in reversed(stripped):
        if FAIL_LINE.match(line):
            return line
    for i in range(len(lines) - 1, -1, -1):
        if EXCEPTION_LINE.match(lines[i]):
            return lines[i].strip() + raised_at(lines[:i])
    for line in reversed(stripped):
        if "out of memory" in line.lower():
            return line
    return next((line for line in reversed(stripped) if line), None)


def raised_at(lines: list[str]) -> str:
    """' (train.py line N)': the innermost frame of the last traceback that is in train.py (the agent's code),
    or '' when the traceback does not pass through it."""
    for line in reversed(lines):
        if line.startswith("Traceback (most recent call last)"):
            break
        if (m := FRAME_LINE.match(line)) and m.group(1).endswith("train.py"):
            return f" ({TRAIN} line {m.group(2)})"
    return ""


def read_tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """Last lines of a file without reading all of it."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    return [line[:MAX_LINE_CHARS] for line in re.split(r"\r\n|\r|\n", data.decode(errors="replace"))][-lines:]


class LogReader:
    """Incremental reader of a run's log: new bytes only, split on \\n or \\r (progress bars rewrite one line
    with \\r), keeping the latest progress, the last `---` summary block and the last lines."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.progress = {"step": None, "percent": None, "loss": None, "seconds_left": None}
        self.summary: dict = {}
        self.in_summary = False
        self.tail: collections.deque[str] = collections.deque(maxlen=200)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, final: bool = False) -> None:
        size = self.size()
        if size - self.offset > MAX_READ_BYTES:
            self.offset, self.partial = size - MAX_READ_BYTES, ""  # lines cut here are lost, the tail matters
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
            self.offset += len(data)
            parts = re.split(r"\r\n|\r|\n", self.partial + data.decode(errors="replace"))
            self.partial = parts.pop()
            if len(self.partial) > MAX_READ_BYTES:  # no newline for a megabyte: treat it as a line
                parts.append(self.partial)
                self.partial = ""
            for line in parts:
                self.line(line)
        if final and self.partial:
            self.line(self.partial)
            self.partial = ""
        elif PROGRESS_LINE.match(self.partial):  # upstream style: "\rstep ..." leaves the newest line unfinished
            self.parse_progress(self.partial)

    def line(self, line: str) -> None:
        self.tail.append(line[:MAX_LINE_CHARS])
        if line.strip() == "---":
            self.summary, self.in_summary = {}, True
            return
        if self.in_summary:
            if m := SUMMARY_LINE.match(line):
                self.summary[m.group(1)] = parse_number(m.group(2))
                return
            self.in_summary = False
        if PROGRESS_LINE.match(line):
            self.parse_progress(line)

    def parse_progress(self, line: str) -> None:
        """Best effort: train.py is agent-edited, any field may be missing or malformed."""
        progress = {"step": int(PROGRESS_LINE.match(line).group(1))}
        for key, pattern in (("percent", PERCENT), ("loss", LOSS), ("seconds_left", REMAINING)):
            if m := pattern.search(line):
                try:
                    value = float(m.group(1))
                except ValueError:
                    continue
                progress[key] = value if math.isfinite(value) else None
        self.progress = {"step": None, "percent": None, "loss": None, "seconds_left": None, **progress}


# ---------------------------------------------------------------------------------------------------------------
# runs


class RunHandle:
    """A run started by this process. `record` is the run's ledger record (folded), `done` is set when final."""

    def __init__(self, run_id: str, commit: str, log_path: Path, result_path: Path):
        self.run_id = run_id
        self.commit = commit
        self.log_path = log_path
        self.result_path = result_path
        self.record: dict = {}
        self.popen: subprocess.Popen | None = None
        self.pid: int | None = None
        self.ticks: int | None = None
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.ended: float | None = None
        self.lock_fd: int | None = None
        self.log = LogReader(log_path)
        self.tracked: dict[int, int] = {}  # every process of the run seen so far: {pid: start_ticks}
        self.stop_reason: str | None = None  # cancelled | timed_out | interrupted | crashed, set to end the run
        self.stop_error: str | None = None
        self.wake = threading.Event()
        self.done = threading.Event()
        self.mutex = threading.Lock()

    @property
    def env_marker(self) -> str:
        return f"AUTORESEARCH_RESULT_FILE={self.result_path}"


class RunManager:
    def __init__(self, workspace: Path, ledger, git, *, profile: str, dataset: str, cache: Path,
                 budget_seconds: float, python: str = sys.executable, device: str = "cpu",
                 timeout_seconds: float | None = None):
        self.workspace = Path(workspace).resolve()
        self.ledger = ledger
        self.git = git
        self.profile = profile
        self.dataset = dataset
        self.cache = Path(cache)
        self.budget_seconds = budget_seconds
        self.python = python
        self.device = device
        self.timeout_seconds = timeout_seconds or 2 * budget_seconds + TIMEOUT_ALLOWANCE_SECONDS
        self.handles: dict[str, RunHandle] = {}  # runs started by this process
        self._current: RunHandle | None = None

    # ------------------------------------------------------------------ queries

    def current(self) -> RunHandle | None:
        handle = self._current
        return handle if handle is not None and not handle.done.is_set() else None

    def get(self, run_id: str) -> RunHandle | None:
        return self.handles.get(run_id)

    def progress(self, run_id: str) -> dict:
        handle = self.require(run_id)
        with handle.mutex:
            progress = dict(handle.log.progress)
        progress["elapsed"] = round((handle.ended or time.monotonic()) - handle.t0, 1)
        return progress

    def require(self, run_id: str) -> RunHandle:
        handle = self.handles.get(run_id)
        if handle is None:
            raise WorkspaceError(f"Run {run_id!r} was not started by this server; read it with results().")
        return handle

    def run_dir(self, run_id: str) -> Path:
        return self.workspace / ".autoresearch" / "runs" / run_id

    def lock_path(self) -> Path:
        return self.cache / "locks" / (re.sub(r"[^A-Za-z0-9._-]", "_", self.device) + ".lock")

    # ------------------------------------------------------------------ start

    def start(self, run_id: str, commit: str, description: str, *, seed: int, kind: str = "experiment",
              pins: dict, session: str | None = None, parent: str | None = None) -> RunHandle:
        if (running := self.current()) is not None:
            raise WorkspaceError(f"Run {running.run_id} is still training; wait for it or cancel it first.")
        if self.git.head() != commit or self.git.train_changed():
            # the ledger says which commit ran: that must be exactly the code on disk
            raise WorkspaceError(f"{TRAIN} on disk is not commit {commit[:12]}; commit it before running.")
        run_dir = self.run_dir(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = RunHandle(run_id, commit, run_dir / "log.txt", run_dir / "result.json")
        handle.lock_fd = self.acquire_lock()
        try:
            handle.result_path.unlink(missing_ok=True)  # a stale result must never pass for this run's
            env = training_env(self.workspace, profile=self.profile, dataset=self.dataset, cache=self.cache,
                               budget=self.budget_seconds, result_file=handle.result_path, seed=seed)
            handle.t0, handle.wall0 = time.monotonic(), time.time()
            with open(handle.log_path, "wb") as log:
                handle.popen = subprocess.Popen(
                    [self.python, TRAIN], cwd=self.workspace, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(handle.lock_fd,))
        except OSError as e:
            os.close(handle.lock_fd)
            raise WorkspaceError(f"Could not start {TRAIN} with {self.python}: {e}") from e
        except BaseException:
            os.close(handle.lock_fd)
            raise
        handle.pid = handle.popen.pid
        handle.ticks = start_ticks(handle.pid)
        self.write_lock_info(handle)
        handle.record = {
            "type": "run", "id": run_id, "session": session, "commit": commit, "parent": parent,
            "description": description, "status": "running", "kind": kind, "val_bpb": None, "metrics": {},
            "profile": self.profile, "dataset": self.dataset, "device": self.device, "seed": seed,
            "budget_seconds": self.budget_seconds, "timeout_seconds": self.timeout_seconds,
            "started_at": now_iso(), "ended_at": None, "pid": handle.pid, "pgid": handle.pid,
            "proc_start_ticks": handle.ticks, "server_pid": os.getpid(), "server_start_ticks": start_ticks(os.getpid()),
            "error": None, "log_tail": None, "decision": None,
        }
        try:
            self.ledger.append(dict(handle.record))
        except BaseException:
            kill_processes(handle.pid, {handle.pid: handle.ticks}, 0)
            handle.popen.wait()
            os.close(handle.lock_fd)
            raise
        self.handles[run_id] = handle
        self._current = handle
        threading.Thread(target=self.monitor, args=(handle, pins), name=f"run-{run_id}", daemon=True).start()
        return handle

    # ------------------------------------------------------------------ device lock

    def acquire_lock(self) -> int:
        path = self.lock_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise WorkspaceError(self.busy_message(path, info)) from None
        return fd

    def ensure_device_free(self) -> None:
        """Raise the busy error now, before the caller commits anything for a run that could not start."""
        os.close(self.acquire_lock())

    def busy_message(self, path: Path, info: str) -> str:
        try:
            holder = json.loads(info)
        except ValueError:
            holder = {}
        who = (f"run {holder.get('run_id')} of workspace {holder.get('workspace')} (pid {holder.get('pid')}, "
               f"started {holder.get('started')})") if holder else "another process"
        msg = f"The {self.device} device is busy: {who} holds {path}. One run at a time per device; "
        if holder.get("pid") and not is_alive(holder["pid"], holder.get("start_ticks")):
            return msg + (f"its main process has exited but a process it spawned still holds the lock; find it "
                          f"with `fuser {path}` and stop it.")
        return msg + "wait for that run to end or cancel it (a lock whose holder dies frees itself)."

    def write_lock_info(self, handle: RunHandle) -> None:
        info = json.dumps({"pid": handle.pid, "start_ticks": handle.ticks, "server_pid": os.getpid(),
                           "workspace": str(self.workspace), "run_id": handle.run_id, "started": now_iso()})
        os.ftruncate(handle.lock_fd, 0)
        os.pwrite(handle.lock_fd, info.encode() + b"\n", 0)

    # ------------------------------------------------------------------ monitor (a daemon thread per run)

    def monitor(self, handle: RunHandle, pins: dict) -> None:
        final = {"status": "crashed", "val_bpb": None, "metrics": {}, "error": "internal error in the run monitor"}
        try:
            next_track = 0.0
            while True:
                exited = handle.popen.poll() is not None
                with handle.mutex:
                    handle.log.read()
                if exited:
                    break
                now = time.monotonic()
                if now >= next_track:
                    handle.tracked.update(run_processes(handle.pid, handle.tracked))
                    next_track = now + TRACK_SECONDS
                if handle.stop_reason is None and now - handle.t0 > self.timeout_seconds:
                    handle.stop_reason = "timed_out"
                if handle.stop_reason is None and handle.log.size() > MAX_LOG_BYTES:
                    handle.stop_reason = "crashed"
                    handle.stop_error = (f"log.txt grew past {MAX_LOG_BYTES // 2**20} MiB: train.py prints too much "
                                         "(print progress at most every few seconds)")
                if handle.stop_reason is not None:
                    handle.tracked.update(run_processes(handle.pid, handle.tracked))
                    kill_processes(handle.pid, {handle.pid: handle.ticks, **handle.tracked}, KILL_GRACE_SECONDS)
                    break
                handle.wake.wait(POLL_SECONDS)
            handle.popen.wait()
            handle.ended = time.monotonic()
            # leftovers: children that outlived train.py, in its group or escaped from it
            leftovers = {**handle.tracked, **run_processes(handle.pid, handle.tracked),
                         **processes_with_env(handle.env_marker)}
            kill_processes(handle.pid, leftovers, 0)
            with handle.mutex:
                handle.log.read(final=True)
            final = self.outcome(handle, pins)
        except Exception as e:  # never leave a run "running" because of a bug here
            final["error"] = f"internal error in the run monitor: {e!r}"
            kill_processes(handle.pid, {handle.pid: handle.ticks, **handle.tracked}, 0)
            handle.popen.wait()
        finally:
            os.close(handle.lock_fd)
            lines = list(handle.log.tail)[-TAIL_LINES:]
            final.update(type="run", id=handle.run_id, ended_at=now_iso(),
                         seconds=round((handle.ended or time.monotonic()) - handle.t0, 1),
                         exit_code=handle.popen.returncode,
                         log_tail=None if final["status"] == "succeeded" else "\n".join(lines))
            try:
                self.ledger.append(dict(final))
            except Exception as e:  # the disk is full or the like: the record stays in memory for wait()
                print(f"autoresearch: could not record the end of run {handle.run_id}: {e!r}", file=sys.stderr)
            handle.record = {**handle.record, **final}
            handle.done.set()

    def outcome(self, handle: RunHandle, pins: dict) -> dict:
        """Status, val_bpb (from the result file only), metrics (from the last `---` block) and error."""
        metrics = {k: v for k, v in handle.log.summary.items() if k != "val_bpb"}  # a printed val_bpb is not data
        failed = {"val_bpb": None, "metrics": metrics}
        rc = handle.popen.returncode
        reason = handle.stop_reason
        if reason == "timed_out":
            return {**failed, "status": "timed_out", "error": (
                f"killed after {self.timeout_seconds:.0f}s, the hard timeout (the training budget is "
                f"{self.budget_seconds:.0f}s; the rest is allowance for startup and evaluation): make sure the "
                "training loop stops at TIME_BUDGET and nothing blocks after evaluate_bpb.")}
        if reason == "cancelled":
            return {**failed, "status": "cancelled", "error": "cancelled before it finished"}
        if reason == "interrupted":
            return {**failed, "status": "interrupted", "error": "the server shut down during the run"}
        if reason == "crashed":
            return {**failed, "status": "crashed", "error": handle.stop_error}
        line = error_line(list(handle.log.tail))
        if rc != 0:
            if rc < 0:
                cause = f"{TRAIN} was killed by {signal.Signals(-rc).name}"
                if -rc == signal.SIGKILL:
                    cause += " (often the kernel's out-of-memory killer)"
            else:
                cause = f"{TRAIN} exited with code {rc}"
            return {**failed, "status": "crashed", "error": f"{cause}: {line}" if line else cause}
        result, problem = self.read_result(handle, pins)
        if problem:
            return {**failed, "status": "crashed", "error": problem}
        return {"status": "succeeded", "val_bpb": result["val_bpb"], "metrics": metrics, "error": None}

    def read_result(self, handle: RunHandle, pins: dict) -> tuple[dict | None, str | None]:
        """The result file evaluate_bpb wrote during this run, checked against the session's pins."""
        path = handle.result_path
        try:
            stat = path.stat()
            result = json.loads(path.read_text())
        except FileNotFoundError:
            return None, (f"no val_bpb: evaluate_bpb never wrote the result file ({TRAIN} must call prepare's "
                          "evaluate_bpb at the end; a printed val_bpb does not count)")
        except ValueError as e:
            return None, f"no val_bpb: the result file is not valid JSON ({e})"
        if stat.st_mtime < handle.wall0 - 1:  # deleted before the start, so this is clock trouble or tampering
            return None, "no val_bpb: the result file predates the run"
        val_bpb = result.get("val_bpb") if isinstance(result, dict) else None
        if not isinstance(val_bpb, (int, float)) or isinstance(val_bpb, bool) or not math.isfinite(val_bpb):
            return None, f"no valid val_bpb in the result file (got {val_bpb!r}): the model diverged or eval failed"
        problems = []
        sha = prepare_sha256(self.workspace)
        if sha != pins.get("prepare_sha256"):
            problems.append(f"{PREPARE} changed during the run (sha256 {str(sha)[:12]}, pinned "
                            f"{str(pins.get('prepare_sha256'))[:12]}); the evaluation harness is frozen: restore it "
                            f"with `git checkout -- {PREPARE}` and never write to it from {TRAIN}")
        pinned = pins.get("profile") or {}
        for key in PINNED_CONSTANTS:
            if result.get(key) != pinned.get(key):
                problems.append(f"the evaluation used {key}={result.get(key)} but the session pinned "
                                f"{key}={pinned.get(key)}")
        if pins.get("val_fingerprint") is not None and result.get("val_fingerprint") != pins["val_fingerprint"]:
            problems.append(f"the validation data changed: fingerprint {str(result.get('val_fingerprint'))[:12]}, "
                            f"pinned {pins['val_fingerprint'][:12]} (re-prepare the data or start a new session)")
        if problems:
            return None, f"val_bpb {val_bpb:.6f} rejected: " + "; ".join(problems)
        return result, None

    # ------------------------------------------------------------------ waiting, cancelling

    async def wait(self, run_id: str, max_wait_seconds: float | None = None, on_progress=None) -> dict:
        """Wait for the run to end, at most max_wait_seconds (then its record says "running"), calling
        `await on_progress(progress)` every ~2 s. Cancelling the waiting task does not stop the run."""
        handle = self.handles.get(run_id)
        if handle is None:
            record = self.ledger.run(run_id)
            if record is None:
                raise WorkspaceError(f"No run {run_id!r} in the ledger; results() lists the run ids.")
            return record
        deadline = None if max_wait_seconds is None else time.monotonic() + max_wait_seconds
        next_report = time.monotonic() + PROGRESS_SECONDS
        while not handle.done.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if on_progress is not None and now >= next_report:
                await on_progress(self.progress(run_id))
                next_report = time.monotonic() + PROGRESS_SECONDS
            await anyio.sleep(POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - now)))
        return dict(handle.record)

    def cancel(self, run_id: str) -> dict:
        """Stop the run (SIGTERM to everything it started, SIGKILL after a grace period); blocks until it is
        recorded `cancelled` (a few seconds at most). A run that already ended keeps its status."""
        return self.stop(run_id, "cancelled")

    def shutdown(self) -> None:
        """At server exit: a run nobody can wait for any more is stopped and recorded `interrupted`."""
        if (handle := self.current()) is not None:
            self.stop(handle.run_id, "interrupted")

    def stop(self, run_id: str, reason: str) -> dict:
        handle = self.require(run_id)
        if not handle.done.is_set():
            handle.stop_reason = handle.stop_reason or reason
            handle.wake.set()
            handle.done.wait()
        return dict(handle.record)

    # ------------------------------------------------------------------ after a server crash

    def recover(self) -> list[str]:
        """Runs the ledger still calls "running" whose server is gone: kill whatever is left of them (the main
        process if it is the same process, by pid and start time; anything carrying the run's environment) and
        record them `interrupted`; their device lock frees itself once they are dead. Returns their ids."""
        recovered = []
        for run in self.ledger.runs():
            if run.get("status") != "running" or run["id"] in self.handles:
                continue
            if is_alive(run.get("server_pid"), run.get("server_start_ticks")):
                continue  # another live server is watching it
            result_file = self.run_dir(run["id"]) / "result.json"
            pid, ticks = run.get("pid"), run.get("proc_start_ticks")
            procs = processes_with_env(f"AUTORESEARCH_RESULT_FILE={result_file}")
            leader_alive = is_alive(pid, ticks) and ticks is not None
            if leader_alive:
                procs[pid] = ticks
                procs.update(run_processes(pid, procs))
            killed = kill_processes(pid if leader_alive else None, procs, KILL_GRACE_SECONDS)
            what = (f"killed its leftover processes (pids {', '.join(map(str, sorted(killed)))})" if killed
                    else "its processes had already exited")
            tail = read_tail(self.run_dir(run["id"]) / "log.txt")
            self.ledger.append({
                "type": "run", "id": run["id"], "status": "interrupted", "val_bpb": None, "ended_at": now_iso(),
                "error": f"the server stopped while this run was training; {what}. Run it again if needed.",
                "log_tail": "\n".join(tail),
            })
            recovered.append(run["id"])
        return recovered
