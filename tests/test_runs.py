"""RunManager: training runs as subprocesses that report honestly and can never wedge the machine.

Most tests drive a fake harness (plain Python, no torch: a train.py, a feeder.py and an evaluator.py that keep the
real ones' protocols) through the real RunManager, launcher and pipeline: the metric comes only from the
evaluator's answer over the launcher's result pipe, the training time from the feeder, crashes are explained,
timeouts and cancellation leave no process behind, one run holds a device at a time across processes, and a server
killed mid-run is cleaned up on restart. The last tests run the real harness end to end on the smoke profile:
feeder, sandboxed trainer, evaluator.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest

from server import runs
from server.errors import WorkspaceError
from server.executor import lock_path
from server.gitops import Git
from server.ledger import Ledger
from server.runs import RunManager
from support import device_lock_is_free, stand_in_workspace

REPO = Path(__file__).resolve().parents[1]
PREPARE_SOURCE = "# the frozen harness (a stand-in: the fake train.py below never imports it)\nMAX_SEQ_LEN = 128\n"
FINGERPRINT = "f" * 64
PROFILE = {"name": "smoke", "max_seq_len": 128, "time_budget": 5, "eval_tokens": 2**14, "vocab_size": 8192}

FEEDER_SECONDS, FEEDER_TOKENS = 4.321, 65536  # what the fake feeder credits every run with
ROWS, TOKENS = 128, 2**14  # what the fake evaluator scores, as the pins say

# The fake feeder: holds its end of the socket pair until the trainer (and all it left) is gone, then reports its
# figures the way training/feeder.py does (status file, one JSON line on stdout).
FAKE_FEEDER = f"""
import json, socket, sys
args = sys.argv
sock = socket.socket(fileno=int(args[args.index("--fd") + 1]))
while True:
    try:
        if not sock.recv(4096):
            break
    except OSError:
        break
figures = {{"phase": "ended", "reason": "trainer closed the feed", "training_seconds": {FEEDER_SECONDS},
           "tokens": {FEEDER_TOKENS}, "warmup_tokens": 0, "batches": 8}}
if "--status" in args:
    open(args[args.index("--status") + 1], "w").write(json.dumps(figures))
print(json.dumps(figures), flush=True)
"""

# The fake evaluator: the real one's request and answer; the "model" it scores is the JSON train.py handed over,
# whose keys override the answer ("refuse": an error; "eval_lines"/"eval_sleep": progress at that pace).
FAKE_EVALUATOR = f"""
import json, os, sys, time
request = json.loads(sys.stdin.readline())
# its working folder is the run's: what it was asked, and its threads, for the tests
open("evaluator-request.json", "w").write(json.dumps({{**request, "threads": os.environ.get("OMP_NUM_THREADS")}}))
if request.get("wait") and sys.stdin.readline().strip() != "go":  # started early: the model comes after "go"
    print(json.dumps({{"ok": False, "error": "told to stop"}}))
    sys.exit(1)
try:
    model = json.load(open(request["graph"]))
except (OSError, ValueError) as e:
    print(json.dumps({{"ok": False, "error": f"cannot load the hand-over ({{e}})"}}))
    sys.exit(1)
print("phase: evaluating", file=sys.stderr, flush=True)
lines = model.pop("eval_lines", 1)
for done in range(1, lines + 1):
    time.sleep(model.get("eval_sleep", 0))
    print(f"eval: {{done * {ROWS} // lines}}/{ROWS} rows", file=sys.stderr, flush=True)
if "refuse" in model:
    print(json.dumps({{"ok": False, "error": model["refuse"]}}))
    sys.exit(1)
answer = {{"ok": True, "profile": request["profile"], "dataset": request["dataset"], "rows_evaluated": {ROWS},
          "tokens_evaluated": {TOKENS}, "val_fingerprint": request["pins"]["data"]["val.bin"], "eval_seconds": 0.1,
          "peak_memory_mb": 99.0}}
answer.update({{k: v for k, v in model.items() if k != "eval_sleep"}})
print(json.dumps(answer))
"""

# Helpers every fake train.py gets: progress lines and the summary block in train.py's format, and the hand-over
# the way evaluate_bpb does it (to $AUTORESEARCH_HANDOVER; here a JSON "model" the fake evaluator scores).
FAKE_HARNESS = f"""
import json, os, subprocess, sys, time
import prepare  # the harness folder is on the import path of a run, wherever its train.py copy lives
os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(prepare.__file__))))  # the tests' files: the workspace

def result(val_bpb=0.987654, **changes):
    with open(os.environ["AUTORESEARCH_HANDOVER"], "w") as f:
        json.dump({{"val_bpb": val_bpb, **changes}}, f)

def progress(step, loss=4.5, left=3):
    print(f"step {{step:05d}} ({{10.0 * step:.1f}}%) | loss: {{loss:.6f}} | lrm: 1.00 | dt: 10ms | "
          f"tok/sec: 1,000 | mfu: 1.0% | epoch: 1 | remaining: {{left}}s", flush=True)

def summary(val_bpb):
    print("---")
    print(f"val_bpb:          {{val_bpb:.6f}}")
    print("training_seconds: 5.0")
    print("peak_vram_mb:     123.4")
    print("mfu_percent:      77.00")
    print("num_steps:        3")
    print("device:           cpu")

def wait_for(name):
    while not os.path.exists(name):
        time.sleep(0.02)

def write_pid(name, pid):
    with open(name + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(name + ".tmp", name)

"""

SUCCEED = """
for step in range(3):
    progress(step)
result()
summary(0.987654)
"""


@pytest.fixture
def workspace(tmp_path):
    return stand_in_workspace(tmp_path / "ws", {"prepare.py": PREPARE_SOURCE, "feeder.py": FAKE_FEEDER,
                                                "evaluator.py": FAKE_EVALUATOR, "train.py": FAKE_HARNESS + SUCCEED},
                              ".autoresearch/\nresults.tsv\n*.pid\ngo\n")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    """Every test must leave no training process behind (found by the result-file path the run inherits, which
    lies under this test's tmp_path); a failing test still gets its processes killed here."""
    yield
    marker = f"AUTORESEARCH_RESULT_FILE={tmp_path.resolve()}/".encode()
    leftovers = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if runs.is_alive(pid, None) and any(entry.startswith(marker) for entry in environ.split(b"\0")):
            os.kill(pid, signal.SIGKILL)
            leftovers.append(pid)
    assert not leftovers, f"training processes survived the test: {sorted(leftovers)}"


def git(ws, *args):
    return subprocess.run(["git", "-C", str(ws), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit_train(ws, source):
    """Write train.py and commit it (as the server does before every run); returns the commit."""
    (ws / "training" / "train.py").write_text(FAKE_HARNESS + textwrap.dedent(source))
    git(ws, "add", "training/train.py")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "experiment")
    return git(ws, "rev-parse", "HEAD")


def pins(ws):
    return {"prepare_sha256": hashlib.sha256((ws / "training" / "prepare.py").read_bytes()).hexdigest(),
            "profile": dict(PROFILE), "val_fingerprint": FINGERPRINT,
            "amounts": {"rows_evaluated": ROWS, "tokens_evaluated": TOKENS},
            "evaluator": {"harness": {}, "data": {"val.bin": FINGERPRINT}}}


def manager(ws, cache, **overrides):
    """The fake trainer runs unsandboxed (it reads and writes the tests' files in the workspace); the sandbox is
    tried on the real harness at the end."""
    options = dict(profile="smoke", dataset="sotu", cache=cache, budget_seconds=5, device="cpu", isolation="none")
    options.update(overrides)
    return RunManager(ws, Ledger(ws), Git(ws), **options)


def start(mgr, source, run_id="r0001", **kwargs):
    commit = commit_train(mgr.workspace, source)
    return mgr.start(run_id, commit, f"test {run_id}", seed=42, pins=pins(mgr.workspace), session="t", **kwargs)


def run(mgr, source, run_id="r0001"):
    """Start a run and wait for its end; returns the final record (as returned by wait)."""
    start(mgr, source, run_id)
    return anyio.run(mgr.wait, run_id, None, None)


def read_pid(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)
    return int(path.read_text())


def dead(pid):
    return not runs.is_alive(pid, None)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------ success


def test_a_successful_run_takes_val_bpb_from_the_evaluator_and_the_clock_from_the_feeder(workspace, cache):
    mgr = manager(workspace, cache)
    source = """
    for step in range(3):
        progress(step)
        time.sleep(0.2)  # long enough for the pipeline to read the trainer's memory from outside
    result(val_bpb=0.987654, forward_flops_per_token=1e6, peak_flops=1e9)  # what the evaluator counts and measures
    summary(0.5)  # the printed number is not the metric
    """
    record = run(mgr, source)
    assert record["status"] == "succeeded"
    assert record["val_bpb"] == 0.987654
    metrics = record["metrics"]
    # the printed summary says 5.0 s, 123.4 MB and 77% MFU: the official figures replace them
    assert metrics["training_seconds"] == FEEDER_SECONDS and metrics["training_tokens"] == FEEDER_TOKENS
    assert metrics["peak_memory_source"] == "rss" and metrics["peak_vram_mb"] != 123.4
    # MFU: 3 x the graph's forward FLOPs per token x the feeder's tokens, over its seconds and the measured peak
    assert metrics["mfu_percent"] == round(100 * 3 * 1e6 * FEEDER_TOKENS / FEEDER_SECONDS / 1e9, 2) != 77.0
    assert metrics["rows_evaluated"] == ROWS and metrics["num_steps"] == 3 and metrics["device"] == "cpu"
    assert record["official"]["val_bpb"] == 0.987654 and record["official"]["trainer_returncode"] == 0
    assert record["isolation"] == "none" and "unsandboxed" in record["isolation_reason"]
    assert record["error"] is None and record["log_tail"] is None
    assert record["exit_code"] == 0
    # the ledger holds the same folded record: running at start, final at the end
    ledger = Ledger(workspace)
    assert ledger.run("r0001")["status"] == "succeeded"
    assert ledger.run("r0001")["val_bpb"] == 0.987654
    # "starting" is on disk before any process exists; "running" names the process; then the end
    assert [r["status"] for r in ledger.records() if r.get("id") == "r0001"] == ["starting", "running", "succeeded"]
    start_record = ledger.records()[0]
    assert start_record["commit"] == git(workspace, "rev-parse", "HEAD") and start_record["pid"] is None
    assert start_record["isolation"] == "none"
    running = ledger.records()[1]
    assert running["pid"] == running["pgid"] and start_record["session"] == "t"
    assert mgr.current() is None
    assert device_lock_is_free()
    assert mgr.progress("r0001")["step"] == 2
    assert mgr.progress("r0001")["phase"] == "done" and mgr.progress("r0001")["percent"] == 100.0


def test_progress_is_parsed_live_and_reported_while_waiting(workspace, cache, monkeypatch):
    monkeypatch.setattr(runs, "PROGRESS_SECONDS", 0.1)
    mgr = manager(workspace, cache)
    source = """
    progress(1, loss=5.25, left=9)
    sys.stdout.write("\\rstep 00002 (20.0%) | loss: 4.750000 | remaining: 8s    ")  # upstream's \\r style
    sys.stdout.flush()
    wait_for("go")
    result()
    summary(0.9)
    """
    handle = start(mgr, source)
    assert mgr.current() is handle and mgr.get("r0001") is handle
    wait_until(lambda: mgr.progress("r0001")["step"] == 2)
    progress = mgr.progress("r0001")
    assert progress["percent"] == 20.0 and progress["loss"] == 4.75 and progress["seconds_left"] == 8.0
    assert progress["elapsed"] >= 0

    reports = []

    async def on_progress(p):
        reports.append(p)

    record = anyio.run(mgr.wait, "r0001", 0.5, on_progress)
    assert record["status"] == "running" and record["id"] == "r0001"  # max_wait passed, the run goes on
    assert reports and reports[-1]["step"] == 2
    (workspace / "go").touch()
    assert anyio.run(mgr.wait, "r0001", None, on_progress)["status"] == "succeeded"


def test_a_phase_shorter_than_the_report_cadence_is_still_reported_in_order(workspace, cache, monkeypatch):
    """A 2 s budget trains for less than one report interval: the waiter still shows warm-up, then training,
    each as it ended, before what the run is doing now (a watched loop skips nothing)."""
    monkeypatch.setattr(runs, "PROGRESS_SECONDS", 30.0)  # no report would come from the cadence alone
    mgr = manager(workspace, cache)
    source = """
    print("phase: warm-up", flush=True)
    progress(1)
    print("phase: training", flush=True)
    progress(2, loss=4.0)
    print("phase: exporting", flush=True)
    wait_for("go")
    result()
    """
    start(mgr, source)
    reports = []

    async def on_progress(p):
        reports.append(p)
        if p["phase"] == "exporting":
            (workspace / "go").touch()

    assert anyio.run(mgr.wait, "r0001", None, on_progress)["status"] == "succeeded"
    phases = [p["phase"] for p in reports]
    shown = [phase for i, phase in enumerate(phases) if i == 0 or phases[i - 1] != phase]
    assert shown == ["starting", "warm-up", "training", "exporting", "evaluating", "done"], phases
    training = reports[phases.index("training")]
    assert training["step"] == 2 and training["loss"] == 4.0 and training["elapsed"] >= 0
    assert [p["elapsed"] for p in reports] == sorted(p["elapsed"] for p in reports)


def test_log_reader_parses_new_bytes_only_even_when_lines_arrive_in_pieces(tmp_path):
    log = tmp_path / "log.txt"
    reader = runs.LogReader(log)
    with open(log, "wb") as f:
        for chunk in [b"hello\nstep 00001 (1", b"0.0%) | loss: 3.5 | remaining: 12s\r", b"step 00002 (20.0%) | lo",
                      b"ss: 3.25 | remaining: 11s\n---\nval_bpb: 0.5\nnum_steps: 2\nmfu_percent: 1.50\n"]:
            f.write(chunk)
            f.flush()
            reader.read()
            if chunk.startswith(b"0.0%"):
                assert reader.progress == {"phase": "training", "step": 1, "percent": 10.0, "loss": 3.5,
                                           "seconds_left": 12.0, "eval_percent": None}
    assert reader.progress == {"phase": "training", "step": 2, "percent": 20.0, "loss": 3.25, "seconds_left": 11.0,
                               "eval_percent": None}
    assert reader.summary == {"val_bpb": 0.5, "num_steps": 2, "mfu_percent": 1.5}
    assert reader.offset == log.stat().st_size


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("source, expected", [
    ("progress(1)\nraise ValueError('boom')\n", "ValueError: boom (training/train.py line "),
    ("progress(1)\nprint('FAIL: loss is NaN/exploding at step 1', flush=True)\nsys.exit(1)\n",
     "FAIL: loss is NaN/exploding at step 1"),
    ("def broken(:\n    pass\n", "SyntaxError: invalid syntax (training/train.py line "),
    ("import flash_attn_3_missing\n", "ModuleNotFoundError: No module named 'flash_attn_3_missing' (training/train.py"),
    ("raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')\n", "CUDA out of memory"),
    ("result()\nsummary(0.9)\nraise SystemExit(3)\n", "exited with code 3"),
    ("print('training', flush=True)\nos.kill(os.getpid(), 9)\n",
     "killed by SIGKILL (often the kernel's out-of-memory killer): training"),
])
def test_a_crash_is_recorded_with_the_relevant_log_line(workspace, cache, source, expected):
    record = run(manager(workspace, cache), source)
    assert record["status"] == "crashed"
    assert record["val_bpb"] is None  # even when evaluate_bpb wrote a result before the crash
    assert expected in record["error"]
    assert record["log_tail"]
    assert Ledger(workspace).run("r0001")["error"] == record["error"]


def test_the_error_line_names_the_exception_and_where_train_py_raised_it():
    log = """step 00012 (4.0%) | loss: 5.1 | remaining: 288s
Traceback (most recent call last):
  File "/ws/training/train.py", line 311, in <module>
    loss = model(x, y)
  File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1773, in _call_impl
    return forward_call(*args, **kwargs)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.
[rank0]: some trailing noise"""
    assert runs.error_line(log.splitlines()) == (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. (training/train.py line 311)")
    assert runs.error_line(["step 00003 (1.0%) | loss: nan", "FAIL", "exiting"]) == "FAIL"
    assert runs.error_line(["loading", "Killed: out of memory (oom-kill)", "bye"]) == "Killed: out of memory (oom-kill)"
    assert runs.error_line(["just some output", ""]) == "just some output"


def test_a_printed_val_bpb_without_a_hand_over_records_no_metric(workspace, cache):
    record = run(manager(workspace, cache), "summary(0.1)\n")
    assert record["status"] == "crashed" and record["val_bpb"] is None
    assert "no model was handed over" in record["error"] and "evaluate_bpb" in record["error"]
    assert "val_bpb" not in record["metrics"]
    assert "val_bpb:          0.100000" in record["log_tail"]


def test_a_forged_result_file_or_a_stale_hand_over_changes_nothing(workspace, cache):
    mgr = manager(workspace, cache)
    stale = mgr.run_dir("r0001") / "model.graph"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"val_bpb": 0.5}))
    record = run(mgr, "print('exits without evaluating')\n")
    assert record["status"] == "crashed" and "no model was handed over" in record["error"]
    forge = """
    for path in (os.environ["AUTORESEARCH_RESULT_FILE"], ".autoresearch/runs/r0002/result.json"):
        json.dump({"val_bpb": 0.01, "rows_evaluated": 128, "tokens_evaluated": 16384}, open(path, "w"))
    result(val_bpb=0.987654)
    """
    record = run(mgr, forge, run_id="r0002")
    assert record["status"] == "succeeded" and record["val_bpb"] == 0.987654
    assert json.loads((mgr.run_dir("r0002") / "result.json").read_text())["val_bpb"] == 0.01  # written, never read


@pytest.mark.parametrize("source, expected", [
    ("result(val_bpb=float('nan'))\n", "no valid val_bpb"),
    ("result(refuse='the model is not causal: ...')\n", "the trusted evaluator refused the model: the model is not"),
    ("open(os.environ['AUTORESEARCH_HANDOVER'], 'w').write('{torn')\n", "cannot load the hand-over"),
])
def test_an_invalid_evaluation_records_no_metric(workspace, cache, source, expected):
    record = run(manager(workspace, cache), source)
    assert record["status"] == "crashed" and record["val_bpb"] is None and expected in record["error"]


@pytest.mark.parametrize("source, expected", [
    ("open('training/prepare.py', 'a').write('EVAL_TOKENS = 1\\n')\nresult()\n", "training/prepare.py changed"),
    ("result(profile='cpu')\n", "profile cpu but the session pinned smoke"),
    ("result(rows_evaluated=64)\n", "rows_evaluated=64"),
    ("result(tokens_evaluated=1024)\n", "tokens_evaluated=1024"),
    ("result(val_fingerprint='0' * 64)\n", "the validation data changed"),
])
def test_a_result_that_breaks_the_pins_fails_the_run(workspace, cache, source, expected):
    record = run(manager(workspace, cache), source)
    assert record["status"] == "crashed" and record["val_bpb"] is None
    assert "rejected" in record["error"] and expected in record["error"]


def test_a_run_that_floods_the_log_is_stopped(workspace, cache, monkeypatch):
    monkeypatch.setattr(runs, "MAX_LOG_BYTES", 2**20)
    record = run(manager(workspace, cache), "while True:\n    print('x' * 10000)\n")
    assert record["status"] == "crashed" and "prints too much" in record["error"]


# ------------------------------------------------------------------------------------------------ no leftovers


def pipeline_in_process(workspace, cache, source):
    """One run's pipeline (server/pipeline.py) in this process, as the launcher runs it, so a test can monkeypatch
    what it decides; returns (its official result, the run dir)."""
    from types import SimpleNamespace

    from server import layout, pipeline
    from server.harness import training_env

    commit_train(workspace, source)
    handle = SimpleNamespace(run_id="r0001", run_dir=layout.run_dir(workspace, "r0001"))
    handle.run_dir.mkdir(parents=True)
    (handle.run_dir / "train.py").write_text((workspace / "training" / "train.py").read_text())
    env = training_env(workspace, profile="smoke", dataset="sotu", cache=cache, budget=5,
                       result_file=layout.result_path(workspace, "r0001"), seed=42)
    spec = manager(workspace, cache).pipeline_spec(handle, env, pins(workspace))
    return pipeline.run_pipeline({**spec, "log": str(handle.run_dir / "log.txt")}), handle.run_dir


@pytest.mark.parametrize("in_force", ["sandbox", "none"])
def test_the_evaluator_keeps_compiled_kernels_only_where_no_trainer_could_write(workspace, cache, monkeypatch,
                                                                              in_force):
    """The evaluator's compile cache (.autoresearch/evaluator-compile) is named to it only while the trainer runs
    sandboxed, which hides the folder; after an unsandboxed trainer the folder is removed, so kernels it planted
    there are never loaded. The pipeline runs with the isolation it believes in force."""
    from server import layout, sandbox

    monkeypatch.setattr(sandbox, "build_command", lambda argv, **_: sandbox.Launch(list(argv), in_force, "test"))
    kernels = layout.evaluator_compile_dir(workspace)
    planted = kernels / "planted.so"
    result, run_dir = pipeline_in_process(workspace, cache, f"""
    import pathlib
    pathlib.Path({str(kernels)!r}).mkdir(parents=True, exist_ok=True)
    pathlib.Path({str(planted)!r}).write_text("kernels a trainer wrote")
    result()
    """)
    assert result["ok"], result
    request = json.loads((run_dir / "evaluator-request.json").read_text())
    if in_force == "sandbox":  # (a real sandbox would have refused the trainer's write)
        assert request["compile_cache"] == str(kernels) and planted.exists()
    else:
        assert "compile_cache" not in request and not kernels.exists()


@pytest.mark.parametrize("set_by_hand", [False, True])
def test_a_cpu_run_on_a_busy_machine_gets_one_thread_per_free_core(workspace, cache, monkeypatch, set_by_hand):
    """Another program keeps a core busy as the run starts: trainer and evaluator get one thread fewer, and the log
    says why. Threads the user set for the server (OMP_NUM_THREADS) are theirs."""
    from server import pool

    monkeypatch.setattr(pool, "spare_threads", lambda limit: (1, 1.0))
    monkeypatch.setattr(pool, "usable_cores", lambda: [0, 1])
    if set_by_hand:
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
    else:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result, run_dir = pipeline_in_process(workspace, cache, """
    print("trainer threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
    result()
    """)
    assert result["ok"], result
    log = (run_dir / "log.txt").read_text()
    evaluator_threads = json.loads((run_dir / "evaluator-request.json").read_text())["threads"]
    if set_by_hand:
        assert "trainer threads 2" in log and "threads: " not in log and evaluator_threads == "2"
    else:
        assert "trainer threads 1" in log and evaluator_threads == "1"
        assert "threads: 1 of 2, other processes keep 1.0 cores busy" in log


def test_the_hard_timeout_kills_the_run(workspace, cache):
    mgr = manager(workspace, cache, timeout_seconds=1)
    handle = start(mgr, "progress(1)\nwhile True:\n    time.sleep(1)\n")
    record = anyio.run(mgr.wait, "r0001", None, None)
    assert record["status"] == "timed_out" and record["val_bpb"] is None
    assert "hard timeout" in record["error"]
    assert dead(handle.pid) and device_lock_is_free()


def test_there_is_no_single_hard_timeout_by_default_but_a_watchdog_per_phase(workspace, cache):
    assert manager(workspace, cache).timeout_seconds is None


@pytest.mark.parametrize("source, phase, cause", [
    ("print('phase: compiling', flush=True)\nwhile True:\n    time.sleep(1)\n", "startup", "reaches its training"),
    ("progress(1)\nwhile True:\n    time.sleep(1)\n", "training", "stops at TIME_BUDGET"),
    ("progress(1)\nprint('phase: exporting', flush=True)\nwhile True:\n    time.sleep(1)\n", "exporting",
     "between its last step"),
    ("print('phase: evaluating', flush=True)\nwhile True:\n    time.sleep(1)\n", "evaluating", "evaluate_bpb"),
])
def test_a_hung_phase_is_killed_by_its_own_watchdog_with_a_message_naming_it(workspace, cache, monkeypatch, source,
                                                                             phase, cause):
    for name in ("STARTUP_SECONDS", "HANDOVER_SECONDS", "EVAL_FIRST_SECONDS", "TRAINING_SLACK_SECONDS"):
        monkeypatch.setattr(runs, name, 0.5)
    monkeypatch.setattr(runs, "TRAINING_FACTOR", 0.0)
    if phase != "startup":
        monkeypatch.setattr(runs, "STARTUP_SECONDS", 60.0)
    record = run(manager(workspace, cache), source)
    assert record["status"] == "timed_out" and record["val_bpb"] is None
    assert f"the {phase} phase ran past its" in record["error"]
    assert "busy machine" in record["error"] and runs.WATCHDOG_FACTOR_ENV in record["error"]
    assert cause in record["error"] and device_lock_is_free()


def test_the_watchdog_factor_gives_every_phase_more_time(workspace, cache, monkeypatch):
    monkeypatch.setattr(runs, "STARTUP_SECONDS", 0.5)
    monkeypatch.setenv(runs.WATCHDOG_FACTOR_ENV, "100")
    source = "print('phase: compiling', flush=True)\ntime.sleep(1.5)\nresult()\nsummary(0.9)\n"
    assert run(manager(workspace, cache), source)["status"] == "succeeded"  # slow, not hung


def test_the_evaluation_limit_comes_from_its_measured_speed(workspace, cache, monkeypatch):
    """A slow evaluation that keeps moving is left alone; one that stops moving is stopped. The progress lines
    are the trusted evaluator's, on its stderr into the run's log, after train.py's summary block."""
    monkeypatch.setattr(runs, "EVAL_FIRST_SECONDS", 0.5)
    monkeypatch.setattr(runs, "EVAL_SLACK_SECONDS", 0.5)
    monkeypatch.setattr(runs, "HANDOVER_SECONDS", 60.0)  # the fake evaluator's start-up is not what is measured
    slow = """
    summary(0.9)
    result(eval_lines=10, eval_sleep=0.3)
    """
    mgr = manager(workspace, cache)
    record = run(mgr, slow)  # 3 s of evaluation, far past the first line's 0.5 s
    assert record["status"] == "succeeded" and record["val_bpb"] == 0.987654
    assert "eval: 128/128 rows" in (workspace / ".autoresearch/runs/r0001/log.txt").read_text()
    stalls = """
    print('phase: evaluating', flush=True)
    print('eval: 1/10 rows', flush=True)
    time.sleep(1000)
    """
    record = run(mgr, stalls, run_id="r0002")
    assert record["status"] == "timed_out" and "the evaluating phase" in record["error"]


def test_phases_follow_the_log_protocol(tmp_path):
    log = tmp_path / "log.txt"
    reader = runs.LogReader(log)
    seen = []
    lines = ["hello", "phase: compiling", "phase: warm-up", "step 00000 (0.0%) | loss: 9.0 | remaining: 10s",
             "phase: training", "step 00005 (50.0%) | loss: 5.0 | remaining: 5s", "phase: exporting",
             "phase: evaluating", "eval: 3/12 rows", "eval: 12/12 rows", "phase: nonsense"]
    with open(log, "w") as f:
        for line in lines:
            f.write(line + "\n")
            f.flush()
            reader.read()
            seen.append((reader.progress["phase"], reader.progress["eval_percent"]))
    assert seen == [("starting", None), ("compiling", None), ("warm-up", None), ("warm-up", None),
                    ("training", None), ("training", None), ("exporting", None), ("evaluating", 0.0),
                    ("evaluating", 25.0), ("evaluating", 100.0), ("evaluating", 100.0)]
    assert reader.progress["step"] == 5 and reader.progress["loss"] == 5.0


def test_an_older_train_py_without_phase_lines_gets_inferred_phases(tmp_path):
    log = tmp_path / "log.txt"
    reader = runs.LogReader(log)
    log.write_text("loading\n")
    reader.read()
    assert reader.progress["phase"] == "starting"
    with open(log, "a") as f:
        f.write("step 00001 (50.0%) | loss: 3.0 | remaining: 5s\n")
    reader.read()
    assert reader.progress["phase"] == "training"
    with open(log, "a") as f:
        f.write("step 00002 (100.3%) | loss: 2.9 | remaining: 0s\n")
    reader.read()
    assert reader.progress["phase"] == "evaluating" and reader.progress["eval_percent"] is None


def test_a_run_that_ignores_sigterm_is_killed(workspace, cache, monkeypatch):
    monkeypatch.setattr(runs, "KILL_GRACE_SECONDS", 0.3)
    mgr = manager(workspace, cache, timeout_seconds=1)
    source = """
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)
    """
    handle = start(mgr, source)
    assert anyio.run(mgr.wait, "r0001", None, None)["status"] == "timed_out"
    assert dead(handle.pid)


SLEEPER = "import time; time.sleep(1000)"
DOUBLE_FORK = (f"import os, subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], "
               "start_new_session=True); open('child.pid.tmp', 'w').write(str(p.pid)); "
               "os.replace('child.pid.tmp', 'child.pid')")
GRANDCHILDREN = {
    # stays in the run's process group
    "in the group": f"write_pid('child.pid', subprocess.Popen([sys.executable, '-c', {SLEEPER!r}]).pid)",
    # leaves the group (its own session); train.py still knows it as a child
    "own session": f"write_pid('child.pid', subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], "
                   "start_new_session=True).pid)",
    # leaves the group and its parent exits: only the inherited environment still ties it to the run
    "own session, orphaned": f"subprocess.run([sys.executable, '-c', {DOUBLE_FORK!r}], check=True)",
}


@pytest.mark.parametrize("spawn", GRANDCHILDREN.values(), ids=GRANDCHILDREN.keys())
@pytest.mark.parametrize("ending", ["succeeds", "times out"])
def test_a_child_process_that_outlives_train_py_is_killed(workspace, cache, spawn, ending):
    mgr = manager(workspace, cache, timeout_seconds=2)
    tail = "result()\nsummary(0.9)\n" if ending == "succeeds" else "while True:\n    time.sleep(1)\n"
    start(mgr, spawn + "\nwait_for('child.pid')\n" + tail)
    child = read_pid(workspace / "child.pid")
    record = anyio.run(mgr.wait, "r0001", None, None)
    assert record["status"] == ("succeeded" if ending == "succeeds" else "timed_out")
    assert dead(child)
    assert device_lock_is_free()


WAITS_FOR_CANCEL = """
progress(1)
write_pid('child.pid', subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1000)'],
                                        start_new_session=True).pid)
while True:
    time.sleep(1)
"""


def test_cancel_stops_the_run_and_everything_it_started(workspace, cache):
    mgr = manager(workspace, cache)
    handle = start(mgr, WAITS_FOR_CANCEL)
    child = read_pid(workspace / "child.pid")
    record = mgr.cancel("r0001")
    assert record["status"] == "cancelled" and record["val_bpb"] is None
    assert Ledger(workspace).run("r0001")["status"] == "cancelled"
    assert dead(handle.pid) and dead(child) and device_lock_is_free()
    assert mgr.current() is None
    assert mgr.cancel("r0001")["status"] == "cancelled"  # cancelling again changes nothing


def test_a_cancel_during_wait_ends_the_wait_with_the_cancelled_record(workspace, cache):
    mgr = manager(workspace, cache)
    start(mgr, WAITS_FOR_CANCEL)
    read_pid(workspace / "child.pid")
    threading.Timer(0.2, mgr.cancel, args=("r0001",)).start()
    assert anyio.run(mgr.wait, "r0001", None, None)["status"] == "cancelled"


def test_a_cancelled_wait_leaves_the_run_running(workspace, cache):
    """The client gave up waiting (its task was cancelled): wait() unwinds at once; stopping is the caller's call."""
    mgr = manager(workspace, cache)
    handle = start(mgr, WAITS_FOR_CANCEL)

    async def give_up():
        with anyio.move_on_after(0.3) as scope:
            await mgr.wait("r0001", None, None)
        return scope.cancelled_caught

    assert anyio.run(give_up)
    assert mgr.current() is handle and runs.is_alive(handle.pid, handle.started)
    assert mgr.cancel("r0001")["status"] == "cancelled"


def test_shutdown_stops_the_current_run_as_interrupted(workspace, cache):
    mgr = manager(workspace, cache)
    handle = start(mgr, WAITS_FOR_CANCEL)
    mgr.shutdown()
    assert Ledger(workspace).run("r0001")["status"] == "interrupted"
    assert dead(handle.pid) and device_lock_is_free()


# ------------------------------------------------------------------------------------------------ one run at a time


def test_one_run_at_a_time_per_manager(workspace, cache):
    mgr = manager(workspace, cache)
    start(mgr, WAITS_FOR_CANCEL)
    with pytest.raises(WorkspaceError, match="r0001 is still training"):
        start(mgr, SUCCEED, run_id="r0002")
    mgr.cancel("r0001")
    assert run(mgr, SUCCEED, run_id="r0002")["status"] == "succeeded"


def test_a_run_trains_the_train_py_of_its_commit_not_the_working_tree(workspace, cache):
    mgr = manager(workspace, cache)
    commit = commit_train(workspace, "wait_for('go')\nresult(val_bpb=0.5)\nsummary(0.5)\n")
    (workspace / "training" / "train.py").write_text("print('uncommitted edit')\n")  # before the start
    mgr.start("r0001", commit, "d", seed=1, pins=pins(workspace))
    (workspace / "training" / "train.py").write_text("result(val_bpb=0.1)\n")  # and during the run
    (workspace / "go").touch()
    record = anyio.run(mgr.wait, "r0001", None, None)
    assert record["status"] == "succeeded" and record["val_bpb"] == 0.5
    copy = mgr.run_dir("r0001") / "train.py"
    committed = subprocess.run(["git", "-C", str(workspace), "show", f"{commit}:training/train.py"],
                               capture_output=True, text=True, check=True).stdout
    assert copy.read_text() == committed


def test_two_managers_contend_for_one_device(tmp_path, workspace, cache):
    other = tmp_path / "other"
    subprocess.run(["git", "clone", "-q", str(workspace), str(other)], check=True)
    # different data caches: the device lock is machine-wide all the same
    first, second = manager(workspace, cache), manager(other, tmp_path / "another-cache")
    start(first, WAITS_FOR_CANCEL)
    with pytest.raises(WorkspaceError) as busy:
        start(second, SUCCEED)
    assert "run r0001" in str(busy.value) and str(workspace.resolve()) in str(busy.value)
    assert Ledger(other).run("r0001") is None
    # another device is another lock
    assert run(manager(other, cache, device="cuda:1"), SUCCEED)["status"] == "succeeded"
    first.cancel("r0001")
    assert run(second, SUCCEED, run_id="r0002")["status"] == "succeeded"


HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "workspace": "/elsewhere", "run_id": "r0042"}).encode())
print("locked", flush=True)
time.sleep(1000)
"""


def test_a_lock_held_by_another_process_is_refused_then_reclaimed_when_it_dies(workspace, cache):
    lock = lock_path("cpu")
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        mgr = manager(workspace, cache)
        with pytest.raises(WorkspaceError) as busy:
            start(mgr, SUCCEED)
        assert "r0042" in str(busy.value) and f"pid {holder.pid}" in str(busy.value)
    finally:
        holder.kill()
        holder.wait()
    assert run(mgr, SUCCEED, run_id="r0002")["status"] == "succeeded"
    assert json.loads(lock.read_text())["run_id"] == "r0002"


# ------------------------------------------------------------------------------------------------ server crash


SERVER = """
import sys, time
from pathlib import Path
from server.gitops import Git
from server.ledger import Ledger
from server.runs import RunManager
ws, cache, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
pins = {"prepare_sha256": sys.argv[4], "profile": %r, "val_fingerprint": %r,
        "evaluator": {"harness": {}, "data": {}}}
mgr = RunManager(ws, Ledger(ws), Git(ws), profile="smoke", dataset="sotu", cache=cache, budget_seconds=5,
                 isolation="none")
handle = mgr.start("r0001", commit, "orphan to be", seed=42, pins=pins, session="t")
print(handle.pid, flush=True)
time.sleep(1000)
""" % (PROFILE, FINGERPRINT)


def server_with_a_run(workspace, cache):
    """A server process that started a run (whose train.py escapes a child into its own session) and then
    sleeps, waiting to be killed: returns the server, the run's launcher pid and the escaped child's pid."""
    commit = commit_train(workspace, WAITS_FOR_CANCEL)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(workspace), str(cache), commit, pins(workspace)["prepare_sha256"]],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    launcher = int(server.stdout.readline())
    return server, launcher, read_pid(workspace / "child.pid")


def test_a_killed_server_takes_its_run_down_and_the_next_one_records_it_interrupted(workspace, cache):
    server, launcher, child = server_with_a_run(workspace, cache)  # child: escaped into its own session
    server.kill()  # SIGKILL: no cleanup of any kind in the server
    server.wait()
    # the launcher sees its server gone and takes the whole run down: no orphan keeps the device
    wait_until(lambda: dead(launcher) and dead(child) and device_lock_is_free(), timeout=30)
    assert Ledger(workspace).run("r0001")["status"] == "running"  # until a server settles it

    mgr = manager(workspace, cache)
    assert mgr.recover() == ["r0001"]
    record = Ledger(workspace).run("r0001")
    assert record["status"] == "interrupted" and "already exited" in record["error"]
    assert "while this run was training" in record["error"]
    assert mgr.recover() == []  # settled once
    assert run(mgr, SUCCEED, run_id="r0002")["status"] == "succeeded"


def test_recover_kills_what_a_dead_server_left_when_its_launcher_died_too(workspace, cache):
    """The launcher killed with its server (kill -9 of both): recovery still finds the run by its environment."""
    server, launcher, child = server_with_a_run(workspace, cache)
    os.kill(launcher, signal.SIGKILL)
    server.kill()
    server.wait()
    wait_until(lambda: dead(launcher))
    assert not dead(child)  # the escaped grandchild outlived both
    assert manager(workspace, cache).recover() == ["r0001"]
    assert "killed its leftover processes" in Ledger(workspace).run("r0001")["error"]
    assert dead(child)


def test_recover_settles_a_run_that_was_still_starting(workspace, cache):
    """A kill -9 between the fsynced "starting" record and the spawn: the next server records it interrupted."""
    Ledger(workspace).append({"type": "run", "id": "r0001", "status": "starting", "pid": None, "commit": "c" * 40,
                              "server_pid": 2**22 + 2, "server_create_time": 1.0})
    assert manager(workspace, cache).recover() == ["r0001"]
    record = Ledger(workspace).run("r0001")
    assert record["status"] == "interrupted" and "while this run was starting" in record["error"]


def test_recover_records_a_run_whose_processes_are_already_gone(workspace, cache):
    Ledger(workspace).append({"type": "run", "id": "r0001", "status": "running", "pid": 2**22 + 1,
                              "proc_start_ticks": 1, "server_pid": 2**22 + 2, "server_start_ticks": 1})
    assert manager(workspace, cache).recover() == ["r0001"]
    record = Ledger(workspace).run("r0001")
    assert record["status"] == "interrupted" and "already exited" in record["error"]


def test_recover_leaves_a_run_of_a_live_server_alone(workspace, cache):
    owner = manager(workspace, cache)
    handle = start(owner, WAITS_FOR_CANCEL)
    assert manager(workspace, cache).recover() == []
    assert runs.is_alive(handle.pid, handle.started)
    owner.cancel("r0001")


@pytest.mark.parametrize("committed", [True, False], ids=["after the commit", "before the commit"])
def test_recover_finds_the_commit_of_a_run_killed_between_its_announcement_and_its_start(workspace, cache,
                                                                                        committed):
    """The server announces a run (fsynced) before it commits train.py; a kill -9 in between leaves a record
    without a commit, which recovery completes from git so that the ledger and the branch agree."""
    mgr = manager(workspace, cache)
    head = git(workspace, "rev-parse", "HEAD")
    mgr.announce("r0001", "killed while starting", seed=42, session="t", head=head)
    Ledger(workspace).append({"type": "run", "id": "r0001", "server_create_time": 1.0, "server_pid": 2**22 + 2})
    expected = commit_train(workspace, SUCCEED + "# the idea\n") if committed else head
    assert manager(workspace, cache).recover() == ["r0001"]
    record = Ledger(workspace).run("r0001")
    assert record["status"] == "interrupted" and record["commit"] == expected
    assert git(workspace, "rev-parse", "refs/autoresearch/runs/r0001") == expected


# ------------------------------------------------------------------------------------------------ the real pipeline

REAL_BUDGET = 2  # seconds of training: enough for a few smoke steps, a hand-over and an evaluation
FORGE = ('import json as _json, os as _os\n'
         'for _path in (_os.environ.get("AUTORESEARCH_RESULT_FILE", "result.json"), "result.json"):\n'
         '    _json.dump({"val_bpb": 0.01, "rows_evaluated": 128, "tokens_evaluated": 16384}, open(_path, "w"))\n')


@pytest.fixture(scope="module")
def real(tmp_path_factory, prepared_cache):
    """A real workspace (the packaged harness and train.py, which forges a result file first thing) and its
    session pins, computed once: describe and the evaluator's --pins, as start_session does."""
    from server import harness
    from server.cli import create_workspace
    ws = tmp_path_factory.mktemp("real") / "ws"
    create_workspace(ws)
    train = ws / "training" / "train.py"
    train.write_text(FORGE + train.read_text())
    git(ws, "add", "training/train.py")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "forges result.json")
    described = harness.describe_harness(ws, "smoke", "sotu", prepared_cache, REAL_BUDGET)
    return ws, prepared_cache, harness.harness_pins(ws, described)


def real_run(real, run_id, isolation):
    ws, cache, session_pins = real
    mgr = RunManager(ws, Ledger(ws), Git(ws), profile="smoke", dataset="sotu", cache=cache,
                     budget_seconds=REAL_BUDGET, device="cpu", isolation=isolation)
    mgr.start(run_id, git(ws, "rev-parse", "HEAD"), f"real {isolation}", seed=42, pins=session_pins, session="t")
    return mgr, anyio.run(mgr.wait, run_id, None, None)


def check_official(mgr, record, session_pins):
    """The record's val_bpb is what the evaluator answered for the graph in the run dir, the clock the feeder's."""
    assert record["status"] == "succeeded", (record["error"], record["log_tail"])
    official = record["official"]
    assert record["val_bpb"] == official["val_bpb"] != 0.01  # the forged result.json was written and ignored
    assert json.loads((mgr.run_dir(record["id"]) / "result.json").read_text())["val_bpb"] == 0.01
    graph = mgr.run_dir(record["id"]) / "model.graph"
    assert official["graph_sha256"] == hashlib.sha256(graph.read_bytes()).hexdigest()
    assert official["rows_evaluated"] == session_pins["amounts"]["rows_evaluated"]
    assert official["val_fingerprint"] == session_pins["val_fingerprint"]
    assert 0 < official["training_seconds"] <= REAL_BUDGET and official["feeder"]["reason"] in (
        "budget spent", "trainer finished")
    assert record["metrics"]["training_seconds"] == official["training_seconds"]  # not train.py's printed figure
    assert record["metrics"]["peak_vram_mb"] == official["peak_memory_mb"] > 0
    log = (mgr.run_dir(record["id"]) / "log.txt").read_text()
    assert "phase: exporting" in log and "phase: evaluating" in log and "eval: 128/128 rows" in log
    assert device_lock_is_free()


@pytest.mark.skipif(not runs.sandbox.probe()[0], reason=f"no sandbox here ({runs.sandbox.probe()[1]})")
def test_the_real_pipeline_scores_a_sandboxed_run_and_ignores_a_forged_result_file(real):
    mgr, record = real_run(real, "r0001", "auto")
    check_official(mgr, record, real[2])
    assert record["isolation"] == "sandbox" and "own pid namespace" in record["isolation_reason"]
    assert Ledger(real[0]).run("r0001")["isolation"] == "sandbox"
    assert (real[0] / ".autoresearch" / "compile-cache").is_dir()  # bound writable for torch.compile's caches


def test_the_real_pipeline_runs_with_isolation_none(real):
    mgr, record = real_run(real, "r0002", "none")
    check_official(mgr, record, real[2])
    assert record["isolation"] == "none" and "unsandboxed" in record["isolation_reason"]


def test_isolation_sandbox_without_a_working_sandbox_is_refused_before_anything_starts(workspace, cache, monkeypatch,
                                                                                       capsys):
    monkeypatch.setattr(runs.sandbox, "probe", lambda: (False, "bwrap not found"))
    mgr = manager(workspace, cache, isolation="sandbox")
    with pytest.raises(WorkspaceError) as refused:
        mgr.ensure_device_free()
    assert "bwrap not found" in str(refused.value) and "apt-get install bubblewrap" in str(refused.value)
    assert "--isolation none" in str(refused.value)
    assert mgr.isolation_status()[0] == "unavailable"
    with pytest.raises(WorkspaceError):
        start(mgr, SUCCEED)
    assert Ledger(workspace).run("r0001") is None  # refused before the starting record
    assert manager(workspace, cache, isolation="auto").isolation_in_force() == (
        "none", "no sandbox here (bwrap not found), so the trainer runs unsandboxed (--isolation auto)")
    from server.cli import main
    assert main(["serve", "--workspace", str(workspace), "--isolation", "sandbox"]) != 0
    assert "bwrap not found" in capsys.readouterr().err


def test_the_trainer_skips_inductors_isa_check_only_where_the_evaluator_recorded_it_changes_nothing(tmp_path):
    """~1.1 s of every CPU trainer's step 0; skipped only on the host the record was made on, with the evaluator's
    own interpreter (so the same torch), on a CPU, when skipping picked the ISA the check picked."""
    from server import pipeline
    spec = {"python": sys.executable, "device": "cpu"}
    assert not pipeline.isa_check_skippable(tmp_path, spec, sys.executable)  # no record yet
    record = {"host": pipeline.socket.gethostname(), "torch": "x", "skip_check": True, "isa": "avx512"}
    (tmp_path / pipeline.ISA_FILE).write_text(json.dumps(record))
    assert pipeline.isa_check_skippable(tmp_path, spec, sys.executable)
    assert not pipeline.isa_check_skippable(tmp_path, {**spec, "device": "cuda:0"}, sys.executable)
    assert not pipeline.isa_check_skippable(tmp_path, {**spec, "python": "/other/python"}, sys.executable)
    for changed in ({"host": "another-host"}, {"skip_check": False}):
        (tmp_path / pipeline.ISA_FILE).write_text(json.dumps({**record, **changed}))
        assert not pipeline.isa_check_skippable(tmp_path, spec, sys.executable)
    (tmp_path / pipeline.ISA_FILE).write_text("{not json")
    assert not pipeline.isa_check_skippable(tmp_path, spec, sys.executable)


def test_the_evaluator_starts_once_the_trainer_greets_the_feeder(tmp_path):
    """Its start-up overlaps the trainer's compilation, not its start-up: the feeder's status says when."""
    from server import pipeline

    class Feeder:
        code = None

        def poll(self):
            return self.code

    feeder, status = Feeder(), tmp_path / "feeder.json"
    assert not pipeline.trainer_started(feeder, str(status))  # no status yet
    status.write_text(json.dumps({"phase": "waiting"}))
    assert not pipeline.trainer_started(feeder, str(status))
    status.write_text(json.dumps({"phase": "warm-up"}))
    assert pipeline.trainer_started(feeder, str(status))
    status.unlink()
    feeder.code = 0  # the feeder ended (training over, or it failed): start it regardless
    assert pipeline.trainer_started(feeder, None)
