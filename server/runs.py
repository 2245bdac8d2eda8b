"""The run lifecycle: start a run from its commit, watch it phase by phase, end it, record it, recover it.

A run trains the train.py of its commit, copied out of git into its own folder (never the working-tree file),
with the harness folder on its import path. Before any process is spawned a "starting" record is fsynced to the
ledger; then the executor launches it on a device (server/executor.py) under a launcher that holds the device
lock, runs the trusted pipeline (server/pipeline.py: feeder, sandboxed trainer, evaluator) and takes the run down
if the server dies; then a "running" record names its processes. A daemon thread per run tails the log
(server/runlog.py) for the phase and progress, enforces each phase's watchdog, and on exit kills everything the
run left behind (server/processes.py), reads the official result from the launcher's result pipe only (never a
file in the run dir), checks it against the pins (server/harness.py) and appends the final record, which says
the isolation that was in force. A server that died mid-run leaves "starting" or
"running" records; the next one settles them (recover).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio

from server import layout, sandbox
from server.errors import WorkspaceError
from server.executor import LocalExecutor, lock_path
from server.gitops import TRAIN
from server.harness import (HARNESS_DIR, check_result, evaluator_pins, trainer_hidden, trainer_readable,
                            training_env)
from server.ledger import now_iso
from server.pipeline import LOG_PREFIX
from server.processes import create_time, is_alive, kill_processes, processes_with_env, run_processes
from server.runlog import (  # noqa: F401 (LogReader and the parsers are read from here by other modules)
    TAIL_LINES, LogReader, empty_progress, error_line, parse_number, read_tail)

KILL_GRACE_SECONDS = 5.0  # after SIGTERM, how long the process group gets to exit before SIGKILL
POLL_SECONDS = 0.2  # monitor tick: reading new log bytes, checking exit, watchdogs, cancellation
TRACK_SECONDS = 1.0  # how often the monitor records the run's descendants (they may escape the group later)
PROGRESS_SECONDS = 2.0  # on_progress cadence in wait()
QUEUE_POLL_SECONDS = 0.5  # how often the scheduler looks for a free slot for a queued run
MAX_LOG_BYTES = 256 * 2**20  # a run printing more than this is killed: it would fill the disk overnight
MAX_RESULT_BYTES = 1 << 20  # the official result is a few hundred bytes; more than this on the pipe is not read

# Watchdogs, one per phase. Generous on purpose: a busy 2-core machine slows an honest run a lot, and a killed
# honest run costs more than a hung one waiting a few extra minutes. AUTORESEARCH_WATCHDOG_FACTOR scales them all.
WATCHDOG_FACTOR_ENV = "AUTORESEARCH_WATCHDOG_FACTOR"
STARTUP_SECONDS = 600.0  # from spawn to the first training step: interpreter, imports, data, torch.compile, warm-up
TRAINING_FACTOR, TRAINING_SLACK_SECONDS = 1.5, 60.0  # the training phase: budget x factor + slack
HANDOVER_SECONDS = 300.0  # exporting: from the end of training to the evaluation's start
EVAL_FIRST_SECONDS = 300.0  # evaluating, until its first `eval:` progress line (or the whole of an older one)
EVAL_FACTOR, EVAL_SLACK_SECONDS = 3.0, 120.0  # then: slack + factor x the time the rows take at measured speed
STARTUP_PHASES = ("starting", "compiling", "warm-up")
PHASE_HINTS = {
    "startup": f"check that {TRAIN} reaches its training loop (imports, data loading, torch.compile)",
    "training": f"make sure {TRAIN}'s training loop stops at TIME_BUDGET",
    "exporting": f"check what {TRAIN} does between its last step and the evaluation",
    "evaluating": "make sure the model's forward pass is not much slower at evaluation and nothing blocks after "
                  "evaluate_bpb",
}


def watchdog_factor() -> float:
    try:
        factor = float(os.environ.get(WATCHDOG_FACTOR_ENV, "1"))
    except ValueError:
        return 1.0
    return factor if factor > 0 else 1.0


def official_figures(official: dict) -> dict:
    """The figures of the official result shown among a run's metrics, under the summary block's names (None where
    the result lacks one): the feeder's clock and tokens, the trusted peak memory and MFU, the evaluator's amounts
    and time."""
    evaluator = official.get("evaluator") or {}
    return {"training_seconds": official.get("training_seconds"), "training_tokens": official.get("training_tokens"),
            "peak_vram_mb": official.get("peak_memory_mb"), "peak_memory_source": official.get("peak_memory_source"),
            "rows_evaluated": official.get("rows_evaluated"), "tokens_evaluated": official.get("tokens_evaluated"),
            "eval_seconds": evaluator.get("eval_seconds"), "isolation": official.get("isolation"),
            "mfu_percent": official.get("mfu_percent")}


# The names of a run's metrics that only trusted code fills, whatever train.py prints under them: its printed
# val_bpb, clock, memory or MFU is never data.
OFFICIAL_METRICS = ("val_bpb", *official_figures({}))


def official_metrics(official: dict) -> dict:
    """The official figures this result has."""
    return {k: v for k, v in official_figures(official).items()
            if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


class RunHandle:
    """A run started by this process. `record` is the run's ledger record (folded), `done` is set when final."""

    def __init__(self, run_id: str, commit: str, run_dir: Path):
        self.run_id = run_id
        self.commit = commit
        self.run_dir = run_dir
        self.log_path = run_dir / layout.LOG_NAME
        self.result_path = run_dir / layout.RESULT_NAME
        self.record: dict = {}
        self.popen: subprocess.Popen | None = None
        self.pid: int | None = None
        self.started: float | None = None  # the launcher's create_time: its identity beside the pid
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.ended: float | None = None
        self.lock = None  # the DeviceLock while the run is being launched
        self.log = LogReader(self.log_path)
        self.tracked: dict[int, float] = {}  # every process of the run seen so far: {pid: create_time}
        self.phase = "starting"
        self.phase_t0 = self.t0
        self.phase_seconds: dict[str, float] = {}  # wall seconds per phase, as the monitor saw them change
        self.eval_seen = 0  # `eval:` lines seen in the current evaluating phase
        self.eval_limit: float | None = None  # the evaluating phase's limit, from its measured speed
        self.stop_reason: str | None = None  # cancelled | timed_out | interrupted | crashed, set to end the run
        self.stop_error: str | None = None
        self.wake = threading.Event()
        self.done = threading.Event()
        self.mutex = threading.Lock()
        self.result_fd: int | None = None  # the read end of the launcher's result pipe
        self.official: dict | None = None  # the official result the pipeline sent, once the launcher exited
        self.result_bytes = b""

    def read_result_pipe(self, final: bool = False) -> None:
        """Take what the launcher wrote on the result pipe so far (never blocks); at the end, parse its last line."""
        if self.result_fd is None:
            return
        while len(self.result_bytes) <= MAX_RESULT_BYTES:
            try:
                chunk = os.read(self.result_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.result_bytes += chunk
        if final:
            os.close(self.result_fd)
            self.result_fd = None
            lines = self.result_bytes.decode(errors="replace").strip().splitlines()
            try:
                official = json.loads(lines[-1]) if lines else None
            except ValueError:
                official = None
            self.official = official if isinstance(official, dict) else None

    @property
    def env_marker(self) -> tuple[str, str]:
        return layout.RESULT_ENV, str(self.result_path)


class RunManager:
    def __init__(self, workspace: Path, ledger, git, *, profile: str, dataset: str, cache: Path,
                 budget_seconds: float, python: str = sys.executable, device: str = "cpu",
                 timeout_seconds: float | None = None, executor: LocalExecutor | None = None,
                 isolation: str = "auto", queue: bool = False, dataset_source: str | None = None):
        self.workspace = Path(workspace).resolve()
        self.ledger = ledger
        self.git = git
        self.profile = profile
        self.dataset = dataset  # the prepared dataset's cache name, what the harness processes are given
        self.dataset_source = dataset_source or dataset  # the folder of a local dataset: hidden from the trainer
        self.cache = Path(cache)
        self.budget_seconds = budget_seconds
        self.python = python
        self.device = device
        self.timeout_seconds = timeout_seconds  # an overall hard limit on top of the phase watchdogs (tests)
        self.executor = executor or LocalExecutor(device, python)
        self.isolation = sandbox.check_isolation(isolation)  # asked for: auto | sandbox | none
        self._evaluator_pins: dict | None = None  # for sessions pinned before the evaluator's pins existed
        self.handles: dict[str, RunHandle] = {}  # runs started by this process
        # queue: a run that finds every slot busy waits as `queued` (else start raises the busy error); the
        # scheduler thread launches queued runs in order as slots free, here or in another server
        self.queueing = queue
        self.queue: list[RunHandle] = []
        self._queue_lock = threading.Lock()
        self._scheduler: threading.Thread | None = None

    # ------------------------------------------------------------------ queries

    def in_flight(self) -> list[RunHandle]:
        """This server's runs queued or training now, oldest first."""
        return [h for h in list(self.handles.values()) if not h.done.is_set()]

    def current(self) -> RunHandle | None:
        """The oldest run in flight (one of several when the pool has more slots)."""
        flying = self.in_flight()
        return flying[0] if flying else None

    def has_room(self) -> bool:
        """Whether start() takes another run now: always when queueing, else when nothing is in flight."""
        return self.queueing or self.current() is None

    @property
    def executor_name(self) -> str:
        return getattr(self.executor, "name", "local")

    def get(self, run_id: str) -> RunHandle | None:
        return self.handles.get(run_id)

    def progress(self, run_id: str) -> dict:
        """phase, step, percent, loss, seconds_left, eval_percent, elapsed; phase "done" at 100% once succeeded."""
        handle = self.require(run_id)
        with handle.mutex:
            progress = dict(handle.log.progress)
        if handle.popen is None and not handle.done.is_set():
            progress["phase"] = "queued"
        if handle.done.is_set() and handle.record.get("status") == "succeeded":
            progress.update(phase="done", percent=100.0, seconds_left=0.0,
                            eval_percent=100.0 if progress.get("eval_percent") is not None else None)
        progress["elapsed"] = round((handle.ended or time.monotonic()) - handle.t0, 1)
        return progress

    def require(self, run_id: str) -> RunHandle:
        handle = self.handles.get(run_id)
        if handle is None:
            raise WorkspaceError(f"Run {run_id!r} was not started by this server; read it with results().")
        return handle

    def run_dir(self, run_id: str) -> Path:
        return layout.run_dir(self.workspace, run_id)

    def lock_path(self) -> Path:
        return lock_path(self.device)

    def ensure_device_free(self) -> None:
        """Raise now, before the caller commits anything, what would stop a run from starting: a busy device, or
        --isolation sandbox where no sandbox works."""
        self.isolation_in_force()
        if not self.queueing:  # a queueing manager takes the run anyway: it waits for a slot as `queued`
            self.executor.ensure_free()

    def try_acquire(self):
        """A free slot's lock, or None when every slot is busy (an executor without a pool: its one device)."""
        if hasattr(self.executor, "try_acquire"):
            return self.executor.try_acquire()
        try:
            return self.executor.acquire()
        except WorkspaceError:
            return None

    def isolation_in_force(self) -> tuple[str, str]:
        """(sandbox | none, the reason line) for the runs this manager starts; WorkspaceError when the sandbox was
        required and does not work here."""
        return sandbox.resolve(self.isolation)

    def isolation_status(self) -> tuple[str, str]:
        """isolation_in_force for status(): never raises; "unavailable" when the sandbox is required but missing."""
        try:
            return self.isolation_in_force()
        except WorkspaceError as e:
            return "unavailable", str(e)

    def pipeline_spec(self, handle: "RunHandle", env: dict, pins: dict) -> dict:
        """The run's trusted pipeline as a plain JSON-able dict (server/pipeline.py documents the keys)."""
        profile = pins.get("profile") or {}
        evaluator = pins.get("evaluator")
        if not evaluator:  # a session pinned before the evaluator's pins existed: asked once per server
            if self._evaluator_pins is None:
                self._evaluator_pins = evaluator_pins(self.workspace, self.profile, self.dataset, self.cache,
                                                      layout.evaluator_compile_dir(self.workspace))
            evaluator = self._evaluator_pins
        return {
            "run_id": handle.run_id, "run_dir": str(handle.run_dir), "state_dir": str(layout.state_dir(self.workspace)),
            "harness_dir": str(Path(self.workspace, HARNESS_DIR).resolve()), "python": self.python, "env": env,
            "isolation": self.isolation, "profile": self.profile, "dataset": self.dataset, "cache": str(self.cache),
            "device": self.device, "evaluator_pins": evaluator,
            "readable": [str(p) for p in trainer_readable(self.workspace, self.cache, self.dataset,
                                                          profile.get("vocab_size"))],
            "hidden": [str(p) for p in trainer_hidden(self.dataset_source)],
            "dataset_source": self.dataset_source, "adapt_threads": "OMP_NUM_THREADS" not in os.environ,
            "evaluator_compile_cache": str(layout.evaluator_compile_dir(self.workspace)), "compile_cache": str(layout.compile_cache_dir(self.workspace)),
            "feeder_status": str(layout.feeder_status_path(self.workspace, handle.run_id)),
        }

    # ------------------------------------------------------------------ start

    def starting_record(self, run_id: str, commit: str | None, description: str, *, seed: int, kind: str,
                        session: str | None, parent: str | None) -> dict:
        return {
            "type": "run", "id": run_id, "session": session, "commit": commit, "parent": parent,
            "description": description, "status": "starting", "kind": kind, "val_bpb": None, "metrics": {},
            "profile": self.profile, "dataset": self.dataset, "device": self.device, "seed": seed,
            "budget_seconds": self.budget_seconds, "timeout_seconds": self.timeout_seconds,
            "started_at": now_iso(), "ended_at": None, "pid": None, "pgid": None, "proc_create_time": None,
            "server_pid": os.getpid(), "server_create_time": create_time(os.getpid()),
            "error": None, "log_tail": None, "decision": None,
            "isolation": None, "isolation_reason": None,
        }

    def announce(self, run_id: str, description: str, *, seed: int, kind: str = "experiment",
                 session: str | None = None, parent: str | None = None, head: str | None = None,
                 commit: str | None = None) -> None:
        """The fsynced "starting" record, written before the run's commit is made (or naming it when it already
        exists) and before any process exists: from here on a kill -9 leaves a record that recover() settles
        (finding the commit if it was made)."""
        record = self.starting_record(run_id, commit, description, seed=seed, kind=kind, session=session,
                                      parent=parent)
        self.ledger.append({**record, "head_before": head})

    def start(self, run_id: str, commit: str, description: str, *, seed: int, kind: str = "experiment",
              pins: dict, session: str | None = None, parent: str | None = None,
              announced: bool = False) -> RunHandle:
        """Launch the train.py of `commit` on a free slot; when every slot is busy, raise the busy error, or with
        queueing record the run `queued` for the scheduler to launch when a slot frees. The caller holds the
        workspace lock."""
        if not self.has_room():
            running = self.current()
            raise WorkspaceError(f"Run {running.run_id} is still training; wait for it or cancel it first.")
        isolation, isolation_reason = self.isolation_in_force()
        source = self.git.show_file(commit, TRAIN)  # the code of the commit, whatever the working tree holds now
        handle = RunHandle(run_id, commit, self.run_dir(run_id))
        handle.run_dir.mkdir(parents=True, exist_ok=True)
        script = handle.run_dir / layout.RUN_TRAIN_NAME
        script.write_text(source, encoding="utf-8")
        handle.result_path.unlink(missing_ok=True)  # a stale result must never pass for this run's
        handle.log_path.write_bytes(b"")
        lock = self.try_acquire() if self.queueing else self.executor.acquire()
        handle.record = self.starting_record(run_id, commit, description, seed=seed, kind=kind, session=session,
                                             parent=parent)
        handle.record.update(isolation=isolation, isolation_reason=isolation_reason, executor=self.executor_name)
        if lock is None:
            handle.record.update(status="queued", device=None)
            self.ledger.append({"type": "run", "id": run_id, "commit": commit, "status": "queued", "device": None,
                                "executor": self.executor_name, "isolation": isolation,
                                "isolation_reason": isolation_reason} if announced else dict(handle.record))
            handle.queued_with = (pins, seed)
            self.handles[run_id] = handle
            with self._queue_lock:
                self.queue.append(handle)
                if self._scheduler is None:
                    self._scheduler = threading.Thread(target=self.schedule, name="run-scheduler", daemon=True)
                    self._scheduler.start()
            return handle
        self.launch(handle, lock, pins, seed, first_record=not announced)
        return handle

    def launch(self, handle: RunHandle, lock, pins: dict, seed: int, first_record: bool = False) -> None:
        """Start a run on the slot it holds (`lock`, released here: the launcher holds it from now on)."""
        run_id, commit = handle.run_id, handle.commit
        handle.lock = lock
        handle.record.update(device=getattr(lock, "device", self.device), status="starting")
        try:
            # fsynced before anything is spawned: recovery will find it, with the commit that runs
            self.ledger.append(dict(handle.record) if first_record else {
                "type": "run", "id": run_id, "commit": commit, "status": "starting",
                "device": handle.record["device"], "executor": self.executor_name,
                "isolation": handle.record.get("isolation"), "isolation_reason": handle.record.get("isolation_reason")})
            env = training_env(self.workspace, profile=self.profile, dataset=self.dataset, cache=self.cache,
                               budget=self.budget_seconds, result_file=handle.result_path, seed=seed)
            try:
                spec = self.pipeline_spec(handle, env, pins)
            except WorkspaceError as e:
                self.ledger.append({"type": "run", "id": run_id, "status": "crashed", "ended_at": now_iso(),
                                    "error": str(e)})
                raise
            handle.t0, handle.wall0 = time.monotonic(), time.time()
            handle.phase_t0 = handle.t0
            read_end, write_end = os.pipe()  # the result channel: the launcher writes, train.py never inherits it
            try:
                handle.popen = self.executor.launch(handle.lock, spec, handle.run_dir, env, handle.log_path,
                                                    write_end)
            except OSError as e:
                os.close(read_end)
                error = f"Could not start the run's launcher with {sys.executable}: {e}"
                self.ledger.append({"type": "run", "id": run_id, "status": "crashed", "ended_at": now_iso(),
                                    "error": error})
                raise WorkspaceError(error) from e
            finally:
                os.close(write_end)
            os.set_blocking(read_end, False)
            handle.result_fd = read_end
            handle.lock_paths = [lk.path for lk in getattr(lock, "locks", [lock])]
        finally:
            handle.lock.release()  # the launcher holds it now (or nothing does: the start failed)
        handle.pid = handle.popen.pid
        handle.started = create_time(handle.pid)
        self.describe_holder(handle)
        handle.record.update(status="running", pid=handle.pid, pgid=handle.pid, proc_create_time=handle.started)
        self.handles[run_id] = handle
        try:
            self.ledger.append({"type": "run", "id": run_id, "status": "running", "pid": handle.pid,
                                "pgid": handle.pid, "proc_create_time": handle.started})
        except BaseException:
            handle.stop_reason = "crashed"
            handle.stop_error = "could not record the run's start in the ledger"
        threading.Thread(target=self.monitor, args=(handle, pins), name=f"run-{run_id}", daemon=True).start()

    def schedule(self) -> None:
        """The scheduler thread: launches queued runs in order as slots free (the locks are machine-wide, so a
        slot another server's run frees counts too), and settles queued runs stopped before they started."""
        while True:
            with self._queue_lock:
                for handle in [h for h in self.queue if h.stop_reason is not None]:
                    self.queue.remove(handle)
                    self.end_queued(handle, "cancelled" if handle.stop_reason == "cancelled" else "interrupted",
                                    "stopped while it was queued for a device")
                if not self.queue:
                    self._scheduler = None
                    return
                handle = self.queue[0]
            lock = self.try_acquire()
            if lock is None:
                time.sleep(QUEUE_POLL_SECONDS)
                continue
            with self._queue_lock:
                if handle.stop_reason is not None or handle not in self.queue:
                    lock.release()
                    continue
                self.queue.remove(handle)
            try:
                self.launch(handle, lock, *handle.queued_with)
            except BaseException as e:  # recorded crashed by launch; the waiters learn it here
                self.end_queued(handle, "crashed", f"the run could not start: {e}", record=False)

    def end_queued(self, handle: RunHandle, status: str, error: str, record: bool = True) -> None:
        final = {"type": "run", "id": handle.run_id, "status": status, "ended_at": now_iso(), "error": error,
                 "val_bpb": None}
        if record:
            try:
                self.ledger.append(dict(final))
            except Exception as e:  # noqa: BLE001 - the record stays in memory for wait()
                print(f"autoresearch: could not record the end of run {handle.run_id}: {e!r}", file=sys.stderr)
        handle.record = {**handle.record, **final}
        handle.ended = time.monotonic()
        handle.done.set()

    def describe_holder(self, handle: RunHandle) -> None:
        """Name the run in the lock file (the launcher holds the lock; this descriptor only writes the note)."""
        info = json.dumps({"pid": handle.pid, "create_time": handle.started, "server_pid": os.getpid(),
                           "workspace": str(self.workspace), "run_id": handle.run_id, "started": now_iso()})
        for path in getattr(handle, "lock_paths", None) or [self.lock_path()]:  # every lock of the run's slot
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, info.encode() + b"\n", 0)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ watchdogs

    def watchdog(self, handle: RunHandle, now: float) -> tuple[str, float, float] | None:
        """(phase, limit, elapsed) of the phase in progress when it has run past its limit, else None."""
        progress = handle.log.progress
        if progress["phase"] != handle.phase:
            handle.phase_seconds[handle.phase] = handle.phase_seconds.get(handle.phase, 0.0) + now - handle.phase_t0
            handle.phase, handle.phase_t0 = progress["phase"], now
            handle.eval_seen, handle.eval_limit = handle.log.eval_lines, None
        factor = watchdog_factor()
        phase = handle.phase
        if phase in STARTUP_PHASES:
            name, limit, elapsed = "startup", STARTUP_SECONDS, now - handle.t0
        elif phase == "training":
            name, limit = "training", self.budget_seconds * TRAINING_FACTOR + TRAINING_SLACK_SECONDS
            elapsed = now - handle.phase_t0
        elif phase == "exporting":
            name, limit, elapsed = "exporting", HANDOVER_SECONDS, now - handle.phase_t0
        else:  # evaluating
            name, elapsed = "evaluating", now - handle.phase_t0
            if handle.log.eval_lines > handle.eval_seen and progress.get("eval_percent"):
                # a new progress line: the rows left take as long as the rows done took, at worst EVAL_FACTOR x
                handle.eval_seen = handle.log.eval_lines
                projected = elapsed * 100.0 / progress["eval_percent"]
                handle.eval_limit = EVAL_SLACK_SECONDS + EVAL_FACTOR * projected
            limit = handle.eval_limit if handle.eval_limit is not None else EVAL_FIRST_SECONDS
        limit *= factor
        return (name, limit, elapsed) if elapsed > limit else None

    def timeout_message(self, name: str, limit: float) -> str:
        return (f"the {name} phase ran past its {limit:.0f} s limit and the run was stopped. The likely cause is a "
                f"busy machine (other work on the same cores or GPU slows every phase): give runs more time by "
                f"starting the server with {WATCHDOG_FACTOR_ENV}=2 (or higher). If the machine was idle, "
                f"{PHASE_HINTS[name]}.")

    # ------------------------------------------------------------------ monitor (a daemon thread per run)

    def monitor(self, handle: RunHandle, pins: dict) -> None:
        final = {"status": "crashed", "val_bpb": None, "metrics": {}, "error": "internal error in the run monitor"}
        try:
            next_track = 0.0
            while True:
                exited = handle.popen.poll() is not None
                with handle.mutex:
                    handle.log.read()
                handle.read_result_pipe()
                if exited:
                    break
                now = time.monotonic()
                if now >= next_track:
                    handle.tracked.update(run_processes(handle.pid, handle.tracked))
                    next_track = now + TRACK_SECONDS
                if handle.stop_reason is None and self.timeout_seconds and now - handle.t0 > self.timeout_seconds:
                    handle.stop_reason = "timed_out"
                    handle.stop_error = (f"killed after {self.timeout_seconds:.0f}s, the hard timeout this server "
                                         f"was started with (the training budget is {self.budget_seconds:.0f}s)")
                if handle.stop_reason is None and (late := self.watchdog(handle, now)) is not None:
                    handle.stop_reason = "timed_out"
                    handle.stop_error = self.timeout_message(late[0], late[1])
                if handle.stop_reason is None and handle.log.size() > MAX_LOG_BYTES:
                    handle.stop_reason = "crashed"
                    handle.stop_error = (f"log.txt grew past {MAX_LOG_BYTES // 2**20} MiB: train.py prints too much "
                                         "(print progress at most every few seconds)")
                if handle.stop_reason is not None:
                    handle.tracked.update(run_processes(handle.pid, handle.tracked))
                    kill_processes(handle.pid, {handle.pid: handle.started, **handle.tracked}, KILL_GRACE_SECONDS)
                    break
                handle.wake.wait(POLL_SECONDS)
            handle.popen.wait()
            handle.ended = time.monotonic()
            # leftovers: children that outlived train.py, in its group or escaped from it
            leftovers = {**handle.tracked, **run_processes(handle.pid, handle.tracked),
                         **processes_with_env(*handle.env_marker)}
            kill_processes(handle.pid, leftovers, 0)
            with handle.mutex:
                handle.log.read(final=True)
            handle.read_result_pipe(final=True)
            final = self.outcome(handle, pins)
        except Exception as e:  # never leave a run "running" because of a bug here
            final["error"] = f"internal error in the run monitor: {e!r}"
            kill_processes(handle.pid, {handle.pid: handle.started, **handle.tracked}, 0)
            handle.popen.wait()
        finally:
            if handle.result_fd is not None:
                os.close(handle.result_fd)
                handle.result_fd = None
            end = handle.ended or time.monotonic()
            phases = {**handle.phase_seconds,
                      handle.phase: handle.phase_seconds.get(handle.phase, 0.0) + end - handle.phase_t0}
            final["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
            official = handle.official or {}
            # where it trained: the executor's answer (a Ray node names itself), else what it was placed on
            final.update({k: official[k] for k in ("executor", "node") if official.get(k)})
            if official.get("executor") == "ray" and official.get("device"):  # the GPU the node gave it
                final["device"] = official["device"]
            final.update(isolation=official.get("isolation") or handle.record.get("isolation"),
                         isolation_reason=official.get("isolation_reason") or handle.record.get("isolation_reason"))
            if official:
                final["official"] = {k: v for k, v in official.items() if k not in ("ok", "error")}
            lines = list(handle.log.tail)[-TAIL_LINES:]
            final.update(type="run", id=handle.run_id, ended_at=now_iso(),
                         seconds=round((handle.ended or time.monotonic()) - handle.t0, 1),
                         exit_code=handle.popen.returncode, phase=handle.log.progress["phase"],
                         log_tail=None if final["status"] == "succeeded" else "\n".join(lines))
            try:
                self.ledger.append(dict(final))
            except Exception as e:  # the disk is full or the like: the record stays in memory for wait()
                print(f"autoresearch: could not record the end of run {handle.run_id}: {e!r}", file=sys.stderr)
            handle.record = {**handle.record, **final}
            handle.done.set()

    def outcome(self, handle: RunHandle, pins: dict) -> dict:
        """Status, val_bpb (from the official result only: the evaluator's score), metrics (the last `---` block
        train.py printed, less the official keys, which only the trusted figures fill) and error."""
        metrics = {k: v for k, v in handle.log.summary.items() if k not in OFFICIAL_METRICS}
        official = handle.official or {}
        metrics.update(official_metrics(official))
        failed = {"val_bpb": None, "metrics": metrics}
        reason = handle.stop_reason
        if reason == "timed_out":
            return {**failed, "status": "timed_out", "error": handle.stop_error}
        if reason == "cancelled":
            return {**failed, "status": "cancelled", "error": "cancelled before it finished"}
        if reason == "interrupted":
            return {**failed, "status": "interrupted", "error": "the server shut down during the run"}
        if reason == "crashed":
            return {**failed, "status": "crashed", "error": handle.stop_error}
        line = error_line([l for l in handle.log.tail if not l.startswith(LOG_PREFIX)])  # train.py's, not ours
        if not official:
            rc = handle.popen.returncode
            cause = (f"the run's launcher was killed by {signal.Signals(-rc).name}" if rc < 0
                     else f"the run's launcher exited with code {rc}") + " before the run had a result"
            return {**failed, "status": "crashed", "error": f"{cause}: {line}" if line else cause}
        if official.get("ok"):
            result, problem = check_result(self.workspace, official, pins)
            if problem:
                return {**failed, "status": "crashed", "error": problem}
            return {"status": "succeeded", "val_bpb": result["val_bpb"], "metrics": metrics, "error": None}
        stage, rc = official.get("stage"), official.get("trainer_returncode")
        if stage == "trainer" and isinstance(rc, int):
            if rc < 0:
                cause = f"{TRAIN} was killed by {signal.Signals(-rc).name}"
                if -rc == signal.SIGKILL:
                    cause += " (often the kernel's out-of-memory killer)"
            else:
                cause = f"{TRAIN} exited with code {rc}"
            return {**failed, "status": "crashed", "error": f"{cause}: {line}" if line else cause}
        if stage == "interrupted":  # the executor lost the run with its node or worker (server/ray_executor.py)
            return {**failed, "status": "interrupted", "error": official.get("error")}
        if stage == "evaluator":
            return {**failed, "status": "crashed", "error": f"the trusted evaluator refused the model: {official.get('error')}"}
        return {**failed, "status": "crashed", "error": official.get("error") or f"the run failed ({stage})"}

    # ------------------------------------------------------------------ waiting, cancelling

    async def wait(self, run_id: str, max_wait_seconds: float | None = None, on_progress=None) -> dict:
        """Wait for the run to end, at most max_wait_seconds (then its record says "running"), calling
        `await on_progress(progress)` every ~2 s, and once more at the end of a run that succeeded (phase done,
        100%). Cancelling the waiting task does not stop the run."""
        handle = self.handles.get(run_id)
        if handle is None:
            record = self.ledger.run(run_id)
            if record is None:
                raise WorkspaceError(f"No run {run_id!r} in the ledger; results() lists the run ids.")
            return record
        deadline = None if max_wait_seconds is None else time.monotonic() + max_wait_seconds
        next_report = time.monotonic() + PROGRESS_SECONDS
        shown = handle.log.phase_changes
        while not handle.done.is_set():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if on_progress is not None and (now >= next_report or handle.log.phase_changes != shown):
                shown, passed = self.phases_passed(handle, shown)
                for progress in passed:  # each phase that ended since the last report, as it ended
                    await on_progress(progress)
                await on_progress(self.progress(run_id))
                next_report = time.monotonic() + PROGRESS_SECONDS
            await anyio.sleep(POLL_SECONDS if deadline is None else max(0.0, min(POLL_SECONDS, deadline - now)))
        if on_progress is not None and handle.done.is_set() and handle.record.get("status") == "succeeded":
            for progress in self.phases_passed(handle, shown, ended=True)[1]:
                await on_progress(progress)
            await on_progress(self.progress(run_id))
        return dict(handle.record)

    @staticmethod
    def phases_passed(handle: RunHandle, shown: int, ended: bool = False) -> tuple[int, list[dict]]:
        """The last progress of each phase that ended after the first `shown` phase changes (and, once the run
        ended, of its final phase), and the count to pass next time."""
        with handle.mutex:
            log = handle.log
            passed = list(log.phases_ended)[-(log.phase_changes - shown):] if log.phase_changes > shown else []
            passed += [dict(log.progress)] if ended else []
            count = log.phase_changes
        elapsed = round((handle.ended or time.monotonic()) - handle.t0, 1)
        return count, [{**progress, "elapsed": elapsed} for progress in passed]

    def cancel(self, run_id: str) -> dict:
        """Stop the run (SIGTERM to everything it started, SIGKILL after a grace period); blocks until it is
        recorded `cancelled` (a few seconds at most). A run that already ended keeps its status."""
        return self.stop(run_id, "cancelled")

    def shutdown(self) -> None:
        """At server exit: a run nobody can wait for any more is stopped and recorded `interrupted`."""
        for handle in sorted(self.in_flight(), key=lambda h: h.popen is not None):  # queued ones first: none
            self.stop(handle.run_id, "interrupted")                                 # may take a freed slot
        close = getattr(self.executor, "close", None)
        if close is not None:  # a private Ray instance goes with the server
            close()

    def stop(self, run_id: str, reason: str) -> dict:
        handle = self.require(run_id)
        if not handle.done.is_set():
            handle.stop_reason = handle.stop_reason or reason
            handle.wake.set()
            handle.done.wait()
        return dict(handle.record)

    # ------------------------------------------------------------------ after a server crash

    def recover(self) -> list[str]:
        """Runs the ledger still calls "queued", "starting" or "running" whose server is gone: kill whatever is left of them
        (the launcher by pid and start time; anything carrying the run's result-file entry) and record them
        `interrupted` with the reason. The launcher takes its run down when its server dies, so usually nothing is
        left; the device lock is the launcher's and freed with it. Returns the ids settled."""
        recovered = []
        for run in self.ledger.runs():
            if run.get("status") not in ("queued", "starting", "running") or run["id"] in self.handles:
                continue
            if run.get("server_create_time") is not None and is_alive(run.get("server_pid"),
                                                                    run["server_create_time"]):
                continue  # another live server is watching it
            commit = self.settle_commit(run)
            result_file = str(layout.result_path(self.workspace, run["id"]))
            procs = processes_with_env(layout.RESULT_ENV, result_file)
            pid, started = run.get("pid"), run.get("proc_create_time")
            leader_alive = started is not None and is_alive(pid, started)
            if leader_alive:
                procs[pid] = started
                procs.update(run_processes(pid, procs))
            killed = kill_processes(pid if leader_alive else None, procs, KILL_GRACE_SECONDS)
            what = (f"killed its leftover processes (pids {', '.join(map(str, sorted(killed)))})" if killed
                    else "its processes had already exited")
            when = {"queued": "while this run was queued for a device (it never started)",
                    "starting": "while this run was starting (its process may never have been spawned)"}.get(
                        run.get("status"), "while this run was training")
            tail = read_tail(layout.log_path(self.workspace, run["id"]))
            self.ledger.append({
                "type": "run", "id": run["id"], "status": "interrupted", "val_bpb": None, "ended_at": now_iso(),
                "error": f"the server stopped {when}; {what}. Run it again if needed.",
                "log_tail": "\n".join(tail), "commit": commit,
            })
            recovered.append(run["id"])
        return recovered

    def settle_commit(self, run: dict) -> str | None:
        """The commit of a run interrupted while starting, made to agree with git: a run announced before its
        commit ran HEAD if HEAD is a new commit on top of the head it started from, else that head. Its run ref is
        (re)set, since the kill may have come between the commit and the ref."""
        commit = run.get("commit")
        try:
            if commit is None and run.get("head_before"):
                head = self.git.head()
                made = head != run["head_before"] and self.git.commit_sha(f"{head}^") == run["head_before"]
                commit = head if made else run["head_before"]
            if commit is not None:
                self.git.set_ref(run["id"], commit)
        except WorkspaceError:  # a repository in a state we cannot read: the record says what we know
            pass
        return commit
