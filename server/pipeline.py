"""One run's trusted pipeline: the feeder, the sandboxed trainer, the evaluator, and the official result.

`run_pipeline(spec)` runs inside the run's launcher (server/launcher.py: the trusted process that holds the device
lock and leads the run's process group), or inside any other trusted host process given the same spec, a plain
JSON-able dict (a Ray task on another node ships it as is). It imports no torch and runs no agent code in its own
process. The steps:

1. feeder     `python -I <harness>/feeder.py --fd N --status <state>/runs/<id>.feeder.json`, on one end of a socket
              pair. It serves the train split only and owns the clock: its figures are the official
              training_seconds and tokens.
2. trainer    `<python> <run dir>/train.py` built by sandbox.build_command (bubblewrap where it works and is asked
              for) and started by sandbox.spawn (--die-with-parent follows the spawning thread), holding the other
              end of the pair; this process keeps no copy once it is spawned. Its stdout and stderr are the run's
              log. env: the run's environment + PYTHONPATH=<harness>, AUTORESEARCH_FEEDER_FD,
              AUTORESEARCH_HANDOVER=<run dir>/model.graph. Its peak memory is sampled from outside (the RSS of its
              process tree; NVML on CUDA when pynvml is importable). When it exits, everything it left is killed.
3. evaluator  `python -I -B <harness>/evaluator.py`: the request on stdin, one JSON line back on stdout, its progress
              (`phase: evaluating`, `eval: n/N rows`) on stderr into the log, where the server's watchdogs read it.

The official result is the evaluator's val_bpb, rows and tokens, the feeder's training_seconds and tokens, the
trusted peak memory, the MFU from those alone (the FLOPs per token the evaluator counts in the handed-over graph,
the feeder's tokens and seconds, the device's peak as the harness knows it), and the isolation that was in force
(with executor, node and device).

How it reaches the server: run_pipeline returns it; the launcher writes it as one JSON line to a pipe whose write
end the server handed it (`--result-fd`) and whose read end the server reads when the launcher exits. Every child
is spawned with close_fds, so the trainer never inherits the pipe; no file path carries the result, so train.py
has nothing to learn from its environment or the run dir; inside the sandbox (own pid namespace) it cannot even
see the launcher. result.json in the run dir is never read by anything. With isolation none the trainer runs as
the server's user in the server's namespaces: a hostile train.py could open /proc/<launcher pid>/fd/N, as it
could edit the ledger; the README's threat model says what isolation none does not protect against.

spec keys (all JSON-able):
  run_id, run_dir, state_dir, harness_dir    paths (strings)
  python            the trainer's interpreter; trusted_python: the feeder's and evaluator's (default: this one)
  env               the run's environment (server.harness.training_env), without the pipeline's own variables
  isolation         auto | sandbox | none (server/sandbox.py)
  profile, dataset, cache, device            the evaluator's request (dataset: its cache name; cache may be null)
  dataset_source    what the user named: a builtin dataset or a local dataset's folder (for messages)
  evaluator_pins    `evaluator.py --pins` of the session
  readable, hidden  extra paths the trainer may read / must not see (sandbox.build_command)
  compile_cache     a per-workspace folder for torch.compile's caches, writable by the trainer (or null)
  evaluator_compile_cache  the evaluator's own compile cache (or null): handed to it only while the trainer is
                    sandboxed (it cannot see the folder), removed after a trainer that ran unsandboxed
  feeder_status     the feeder's status file (outside the run dir)
  executor, node    where the run is placed (default "local" and this host's name)
  adapt_threads     a CPU run's threads are cut to the cores no other process keeps busy at its start (unless the
                    user set OMP_NUM_THREADS for the server)
  feeder_args       optional extra feeder arguments (tests: --warmup-tokens 0)
  log               optional: the run's log file, appended to (a host whose stdout is not the log: a Ray task)
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from server import layout, pool, processes, sandbox
from server.errors import WorkspaceError

FEEDER_FD_ENV = "AUTORESEARCH_FEEDER_FD"     # training/feeder.py's FD_ENV
HANDOVER_ENV = "AUTORESEARCH_HANDOVER"       # training/handover.py's HANDOVER_ENV
ISA_FILE = "vec-isa.json"                    # training/evaluator.py's ISA_FILE, in its compile cache
SAMPLE_SECONDS = 0.25   # how often the trainer's process tree and its memory are read from outside
TRACK_SECONDS = 1.0     # how often the whole tree is looked up again (new descendants)
FEEDER_EXIT_SECONDS = 10.0  # after the trainer is gone, the feeder sees EOF and reports; this long at most
GRACE_SECONDS = 3.0     # SIGTERM to SIGKILL for what the trainer left behind
MAX_LINE = 1 << 20      # a child's JSON answer is far smaller; more is not read
LOG_PREFIX = "[autoresearch] "  # the pipeline's own lines in the run's log


def log(line: str, out=None) -> None:
    """A line of the pipeline's own in the run's log (`out`, else this process's stdout, the launcher's being the
    log). Bracketed so that it never reads as a `key: value` line: it also closes train.py's `---` summary block
    before the evaluator's lines."""
    data = f"{LOG_PREFIX}{line}\n".encode()
    if out is None:
        sys.stdout.flush()
        os.write(1, data)
    else:
        out.write(data)
        out.flush()


def cpu_threads(env: dict, out) -> dict:
    """The thread settings of a CPU run starting now: its slot's (or every core) less the cores other programs keep
    busy (server/pool.py), said in the log when that is fewer. Trainer and evaluator both get them."""
    limit = int(env.get("OMP_NUM_THREADS") or len(pool.usable_cores()))
    threads, busy = pool.spare_threads(limit)
    if threads >= limit:
        return {}
    log(f"threads: {threads} of {limit}, other processes keep {busy:.1f} cores busy (more threads than free cores "
        "wait for one another)", out)
    return pool.thread_env(threads)


def run_pipeline(spec: dict) -> dict:
    """Run one experiment end to end; returns the official result (a JSON-able dict, see the module docstring).
    `ok` False with `stage` (sandbox | trainer | handover | evaluator | pipeline) and `error` when it failed;
    `trainer_returncode` is the trainer's exit status (negative: killed by that signal).
    The run's log: spec["log"] (a path, appended to) when given, else this process's stdout and stderr."""
    if not spec.get("log"):
        return _run(spec, None)
    with open(spec["log"], "ab") as out:
        return _run(spec, out)


def _run(spec: dict, out) -> dict:
    t0 = time.time()
    run_dir = Path(spec["run_dir"])
    result = {"ok": False, "stage": None, "error": None, "trainer_returncode": None,
              "isolation": None, "isolation_reason": None, "executor": spec.get("executor", "local"),
              "node": spec.get("node") or socket.gethostname(), "device": spec.get("device")}
    trusted = spec.get("trusted_python") or sys.executable
    harness = Path(spec["harness_dir"])
    graph = run_dir / layout.HANDOVER_NAME
    graph.unlink(missing_ok=True)  # a stale hand-over must never be scored for this run
    env = {k: str(v) for k, v in spec["env"].items()}
    if spec.get("adapt_threads") and str(spec.get("device") or "cpu").startswith("cpu"):
        env.update(cpu_threads(env, out))
    trusted_env = {k: v for k, v in env.items() if k not in (layout.RESULT_ENV, "PYTHONPATH")}

    # 1. the trainer's command and the isolation in force (before anything is spawned: a refusal costs nothing)
    try:
        launch = sandbox.build_command(
            [spec["python"], str(run_dir / "train.py")], isolation=spec.get("isolation", "auto"), run_dir=run_dir,
            state_dir=Path(spec["state_dir"]), cache_dir=spec.get("cache") and Path(spec["cache"]),
            readable=[Path(p) for p in spec.get("readable", ())], hidden=[Path(p) for p in spec.get("hidden", ())],
            python=spec["python"], compile_cache=spec.get("compile_cache") and Path(spec["compile_cache"]))
    except WorkspaceError as e:
        return {**result, "stage": "sandbox", "error": str(e)}
    result.update(isolation=launch.isolation, isolation_reason=launch.reason)
    log(f"isolation {launch.isolation}: {launch.reason}", out)

    # 2. feeder and trainer on a socket pair
    feeder_end, trainer_end = socket.socketpair()
    feeder_cmd = [trusted, "-I", str(harness / "feeder.py"), "--fd", str(feeder_end.fileno()),
                  *(["--status", str(spec["feeder_status"])] if spec.get("feeder_status") else []),
                  *map(str, spec.get("feeder_args", ()))]
    trainer_env = {**env, "PYTHONPATH": str(harness), FEEDER_FD_ENV: str(trainer_end.fileno()),
                   HANDOVER_ENV: str(graph)}
    if launch.isolation == "none" and spec.get("compile_cache"):  # the sandbox names it itself
        cache = Path(spec["compile_cache"])
        trainer_env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        trainer_env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    evaluator_cache = spec.get("evaluator_compile_cache")
    if launch.isolation == "sandbox" and evaluator_cache and isa_check_skippable(Path(evaluator_cache), spec, trusted):
        trainer_env.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
    feeder = trainer = None
    try:
        feeder = subprocess.Popen(feeder_cmd, env=trusted_env, cwd=str(run_dir), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=out, pass_fds=(feeder_end.fileno(),))
        feeder_end.close()
        feeder_out = drain(feeder.stdout)
        trainer = sandbox.spawn(launch.argv, env=trainer_env, cwd=str(run_dir), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out and subprocess.STDOUT,
                                pass_fds=(trainer_end.fileno(),), start_new_session=True)
    except OSError as e:
        if feeder is not None:
            feeder.kill()
            feeder.wait()
        return {**result, "stage": "pipeline", "error": f"could not start the run's processes: {e}"}
    finally:
        feeder_end.close()
        trainer_end.close()  # from here the trainer holds the only copy: its exit is the feeder's EOF
    t_trainer = time.time()
    watch = TreeWatch(trainer.pid, spec.get("device") or "cpu")
    # The evaluator starts once the trainer is past its own start-up (it greeted the feeder, and compiles): its
    # imports, pin checks and data copy (~3 s of one core) overlap the trainer's compilation, which leaves a core
    # idle on a small machine, instead of following the export. It reads the graph only once told "go", after the
    # trainer and everything it left are gone.
    request = {"graph": str(graph), "profile": spec["profile"], "dataset": spec["dataset"], "cache": spec.get("cache"),
               "pins": spec["evaluator_pins"], "device": spec.get("device"), "wait": True}
    if evaluator_cache and launch.isolation == "sandbox":
        request["compile_cache"] = evaluator_cache
    evaluator = Evaluator(trusted, harness, request, trusted_env, run_dir, out)
    status = spec.get("feeder_status")
    returncode = watch.wait(trainer, lambda: evaluator.proc is not None
                            or (trainer_started(feeder, status) and evaluator.start()))
    result["trainer_returncode"] = returncode
    trainer_seconds = time.time() - t_trainer
    left = watch.leftovers(env.get(layout.RESULT_ENV))
    if left:
        processes.kill_processes(None, left, GRACE_SECONDS)
        log(f"killed {len(left)} process(es) train.py left running", out)
    if evaluator_cache and launch.isolation != "sandbox":  # an unsandboxed trainer could have planted kernels there
        shutil.rmtree(evaluator_cache, ignore_errors=True)
    result.update(feeder_figures(feeder, feeder_out, spec.get("feeder_status")))
    result.update(peak_memory_mb=watch.peak_mb, peak_memory_source=watch.source)
    result["timings"] = {"trainer_seconds": round(trainer_seconds, 3)}
    log(f"train.py exited with status {returncode} after {trainer_seconds:.1f} s; the feeder credited "
        f"{result['training_seconds']} s of training, {result['training_tokens']} tokens", out)
    if returncode != 0:
        evaluator.stop()
        return {**result, "stage": "trainer", "error": f"train.py exited with status {returncode}"}
    if not graph.is_file():
        evaluator.stop()
        return {**result, "stage": "handover",
                "error": ("no model was handed over: train.py must end by calling prepare's evaluate_bpb, which "
                          "exports the model for the trusted evaluator (a printed val_bpb does not count)")}

    # 3. the evaluator scores the hand-over
    t_eval = time.time()
    early = evaluator.proc is not None
    answer, code = evaluator.finish()
    result["timings"].update(evaluator_seconds=round(time.time() - t_eval, 3), evaluator_started_early=early,
                             total_seconds=round(time.time() - t0, 3))
    if not answer.get("ok"):
        return {**result, "stage": "evaluator", "error": answer.get("error") or f"the evaluator exited with {code}"}
    if watch.source is None and isinstance(answer.get("peak_memory_mb"), (int, float)):
        result.update(peak_memory_mb=answer["peak_memory_mb"], peak_memory_source="evaluator")
    keep = ("val_bpb", "rows_evaluated", "tokens_evaluated", "bytes_evaluated", "val_fingerprint", "profile",
            "dataset", "batch_rows", "precision", "probe_rows", "graph_sha256")
    result.update({k: answer.get(k) for k in keep})
    result["evaluator"] = {k: answer.get(k) for k in ("startup_seconds", "load_seconds", "eval_seconds",
                                                      "peak_memory_mb", "compiled", "forward_flops_per_token",
                                                      "peak_flops", "peak_flops_dtype")}
    result["mfu_percent"] = mfu_percent(result, answer)
    result.update(ok=True, stage=None, error=None)
    return result


def isa_check_skippable(evaluator_cache: Path, spec: dict, trusted: str) -> bool:
    """Whether the trainer may skip inductor's per-process vector ISA check (~1.1 s of its step 0 on a CPU): the
    evaluator recorded that skipping it picks the same ISA on this host (training/evaluator.py, ISA_FILE), with the
    same interpreter, hence the same torch, as the trainer's."""
    if not str(spec.get("device") or "cpu").startswith("cpu") or spec["python"] != trusted:
        return False
    try:
        record = json.loads((evaluator_cache / ISA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("host") == socket.gethostname() and record.get("skip_check") is True


def trainer_started(feeder: subprocess.Popen, status_path: str | None) -> bool:
    """Whether the trainer is past its start-up: it greeted the feeder (the feeder's status left "waiting"), or the
    feeder has ended."""
    if feeder.poll() is not None:
        return True
    try:
        return bool(status_path) and json.loads(Path(status_path).read_text()).get("phase") not in (None, "waiting")
    except (OSError, ValueError):
        return False


def mfu_percent(result: dict, answer: dict) -> float | None:
    """MFU from trusted figures only: the model's training FLOPs per token (3 x the forward the evaluator counted in
    the handed-over graph: forward and backward) x the tokens the feeder served on its clock, over the feeder's
    training seconds and the device's peak as the harness measures or looks it up. None where a figure is missing."""
    figures = (answer.get("forward_flops_per_token"), answer.get("peak_flops"), result.get("training_tokens"),
               result.get("training_seconds"))
    if not all(isinstance(f, (int, float)) and f > 0 for f in figures):
        return None
    flops, peak, tokens, seconds = figures
    return round(100 * 3 * flops * tokens / seconds / peak, 2)


class Evaluator:
    """The evaluator process of one run: started early with the request (`wait`: it prepares, then waits for "go"
    on stdin before it reads the graph), told to go or to stop. Its stderr is the run's log."""

    def __init__(self, python: str, harness: Path, request: dict, env: dict, cwd: Path, out=None):
        self.argv = [python, "-I", "-B", str(harness / "evaluator.py")]
        self.request, self.env, self.cwd, self.out = request, env, cwd, out
        self.proc: subprocess.Popen | None = None

    def start(self) -> bool:
        if self.proc is None:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=str(self.cwd), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self.out)
            try:
                self.proc.stdin.write((json.dumps(self.request) + "\n").encode())
                self.proc.stdin.flush()
            except OSError:  # it died at once; finish() reports what it said
                pass
        return True

    def finish(self) -> tuple[dict, int]:
        """Tell it to go (starting it now if training ended without the feeder noticing first): (its answer, its
        exit status)."""
        self.start()
        try:
            answer, _ = self.proc.communicate(b"go\n")
        except (BrokenPipeError, ValueError):
            answer = self.proc.stdout.read()
            self.proc.wait()
        return last_json(answer or b""), self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.communicate()


def evaluate(python: str, harness: Path, request: dict, env: dict, cwd: Path, out=None) -> tuple[dict, int]:
    """Run the evaluator on one whole request at once: (its answer, its exit status)."""
    return Evaluator(python, harness, {**request, "wait": False}, env, cwd, out).finish()


def last_json(out: bytes) -> dict:
    for line in reversed(out[-MAX_LINE:].decode(errors="replace").splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def drain(stream) -> tuple[threading.Thread, list[bytes]]:
    """Read a child's stdout to its end in a thread (a full pipe must never stall it): (the thread, its bytes)."""
    chunks: list[bytes] = []
    thread = threading.Thread(target=lambda: chunks.append(stream.read()), daemon=True, name="drain")
    thread.start()
    return thread, chunks


def feeder_figures(feeder: subprocess.Popen, out: tuple, status_path: str | None) -> dict:
    """The feeder's official figures: its stdout report, else its status file. Waits for it to end (it sees EOF
    once the trainer and all it left are gone), then kills it if it did not."""
    try:
        feeder.wait(FEEDER_EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        feeder.kill()
        feeder.wait()
    thread, chunks = out
    thread.join(FEEDER_EXIT_SECONDS)
    figures = last_json(b"".join(chunks))
    if "training_seconds" not in figures and status_path:
        try:
            figures = json.loads(Path(status_path).read_text())
        except (OSError, ValueError):
            figures = {}
    return {"training_seconds": figures.get("training_seconds"), "training_tokens": figures.get("tokens"),
            "warmup_tokens": figures.get("warmup_tokens"),
            "feeder": {k: figures.get(k) for k in ("phase", "reason", "batches", "warmup_batches", "B", "T",
                                                   "budget_seconds", "epoch")}}


class TreeWatch:
    """The trainer's process tree, read from outside while it runs: every process ever seen in it (to kill what it
    leaves) and its peak memory (the RSS of the whole tree; on CUDA the device memory NVML attributes to it)."""

    def __init__(self, pid: int, device: str):
        self.pid = pid
        self.tracked: processes.Procs = {}
        self.peaks: dict[str, float] = {}  # MiB by source
        self.nvml = open_nvml() if device.startswith("cuda") else None

    def wait(self, proc: subprocess.Popen, on_tick=None) -> int:
        next_track = 0.0
        while True:
            self.sample()
            if on_tick is not None:
                on_tick()
            try:
                return proc.wait(SAMPLE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now >= next_track:
                self.tracked.update(processes.run_processes(self.pid, self.tracked))
                next_track = now + TRACK_SECONDS

    def sample(self) -> None:
        pids = set(self.tracked) | {self.pid}
        rss = 0
        for pid in pids:
            try:
                rss += psutil.Process(pid).memory_info().rss
            except processes.GONE:
                continue
        if rss:
            self.peaks["rss"] = max(self.peaks.get("rss", 0.0), rss / 2**20)
        if self.nvml is not None and (used := nvml_used_mb(self.nvml, pids)) is not None:
            self.peaks["nvml"] = max(self.peaks.get("nvml", 0.0), used)

    @property
    def source(self) -> str | None:
        """nvml once NVML attributed device memory to the tree (a GPU run's figure), else rss, else None."""
        return next((s for s in ("nvml", "rss") if s in self.peaks), None)

    @property
    def peak_mb(self) -> float | None:
        return round(self.peaks[self.source], 1) if self.source else None

    def leftovers(self, marker: str | None) -> processes.Procs:
        """Everything of the trainer's still alive: its session (it leads one), every descendant seen, and anything
        carrying the run's marker (a double-forked daemon that left the session)."""
        procs = processes.run_processes(self.pid, self.tracked, (layout.RESULT_ENV, marker))
        return {pid: t for pid, t in procs.items() if processes.is_alive(pid, t)}


def open_nvml():
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:  # not installed, no driver: RSS or the evaluator's figure instead
        return None


def nvml_used_mb(nvml, pids: set[int]) -> float | None:
    """Device memory NVML attributes to these processes, over every GPU; None when it attributes none."""
    total, seen = 0, False
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
                    seen = True
    except Exception:
        return None
    return total / 2**20 if seen else None


def write_result(fd: int, result: dict) -> None:
    """The launcher's half of the result channel: one JSON line on the pipe the server handed it."""
    data = (json.dumps(result) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]
    os.close(fd)

