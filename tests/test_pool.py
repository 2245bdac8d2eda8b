"""The device pool (server/pool.py): parsing --devices, each slot's run environment, the machine-wide lock names, and
that servers sharing a pool never run more runs at once than it has slots."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest

from server import pool
from server.errors import WorkspaceError
from server.gitops import Git
from server.ledger import Ledger
from server.pool import Pool, PoolExecutor, parse_devices
from server.runs import RunManager
from support import git, stand_in_workspace

FOUR_CORES = [0, 1, 2, 3]


# ---------------------------------------------------------------- parsing


def test_cpu_n_splits_the_cores_into_n_slots_with_their_threads_set():
    slots = parse_devices("cpu:2", cores=FOUR_CORES)
    assert [s.name for s in slots] == ["cpu:0", "cpu:1"]
    assert [s.cores for s in slots] == [(0, 1), (2, 3)]
    assert all(s.device == "cpu" for s in slots)
    assert slots[0].env["OMP_NUM_THREADS"] == "2" and slots[0].env["MKL_NUM_THREADS"] == "2"
    assert slots[0].env["CUDA_VISIBLE_DEVICES"] == ""  # a CPU slot never wanders onto a GPU
    uneven = parse_devices("cpu:3", cores=[0, 1, 2, 3, 4])
    assert [s.cores for s in uneven] == [(0, 1), (2, 3), (4,)]
    assert [s.env["OMP_NUM_THREADS"] for s in uneven] == ["2", "2", "1"]


def test_auto_is_every_gpu_else_one_cpu_slot_of_every_core():
    assert [s.name for s in parse_devices("auto", gpus=[0, 1], cores=FOUR_CORES)] == ["cuda:0", "cuda:1"]
    (only,) = parse_devices("auto", gpus=[], cores=FOUR_CORES)
    assert only.name == "cpu" and only.cores == (0, 1, 2, 3) and only.env["OMP_NUM_THREADS"] == "4"
    assert parse_devices(None, gpus=[], cores=FOUR_CORES) == parse_devices("cpu", gpus=[], cores=FOUR_CORES)


def test_a_gpu_slot_sees_only_its_gpu():
    slots = parse_devices("cuda:1, cuda:3", gpus=[0, 1, 2, 3])
    assert [(s.name, s.device, s.env) for s in slots] == [
        ("cuda:1", "cuda", {"CUDA_VISIBLE_DEVICES": "1"}), ("cuda:3", "cuda", {"CUDA_VISIBLE_DEVICES": "3"})]
    assert [s.locks for s in slots] == [("cuda:1",), ("cuda:3",)]  # the names executor.py always used


def test_gpu_n_counts_runs_on_a_ray_clusters_gpus_wherever_they_are():
    slots = parse_devices("gpu:3", gpus=[], cores=FOUR_CORES)  # a head node with no GPU of its own
    assert [(s.name, s.device, s.env) for s in slots] == [(f"gpu:{i}", "cuda", {}) for i in range(3)]
    assert len({lock for s in slots for lock in s.locks}) == 3  # three in flight from this machine, no more
    with pytest.raises(WorkspaceError, match="needs --executor ray"):
        pool.make_executor(type("S", (), {"executor": "local", "devices": "gpu:3", "ray_address": None})())


@pytest.mark.parametrize("value, says", [
    ("gpu", "not understood"),
    ("cuda:0,cpu:1", "not understood"),
    ("cpu:0", "at least one slot"),
    ("cpu:9", "cpu:4 or fewer"),
    ("cuda:0,cuda:0", "listed twice"),
    ("cuda:7", "no GPU cuda:7"),
])
def test_a_bad_value_says_what_to_pass_in_one_line(value, says):
    with pytest.raises(WorkspaceError) as bad:
        parse_devices(value, gpus=[0, 1], cores=FOUR_CORES)
    assert says in str(bad.value) and "\n" not in str(bad.value)
    assert "--devices" in str(bad.value)


def test_local_gpus_reads_the_driver_without_torch(tmp_path, monkeypatch):
    monkeypatch.setattr(pool.shutil, "which", lambda name: None)  # no nvidia-smi: the /proc folder counts
    (tmp_path / "0000:01:00.0").mkdir()
    (tmp_path / "0000:02:00.0").mkdir()
    monkeypatch.setattr(pool, "NVIDIA_PROC", tmp_path)
    assert pool.local_gpus() == [0, 1]
    monkeypatch.setattr(pool, "NVIDIA_PROC", tmp_path / "absent")
    assert pool.local_gpus() == []
    assert "import torch" not in open(pool.__file__).read()



@pytest.mark.parametrize("flags, says", [
    (["--devices", "gpu0"], "--devices 'gpu0' is not understood"),
    (["--ray-address", "local"], "--ray-address local needs --executor ray"),
    (["--devices", "gpu:8"], "--devices gpu:8 counts a Ray cluster's GPUs and needs --executor ray"),
])
def test_serve_refuses_bad_pool_flags_in_one_line(flags, says, tmp_path, capsys):
    from server.cli import main

    assert main(["serve", "--workspace", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and err.startswith("error: ") and len(err.splitlines()) == 1


def test_serve_executor_ray_without_ray_names_the_pip_command(tmp_path, capsys, monkeypatch):
    from server.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    assert main(["serve", "--workspace", str(tmp_path), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == 'error: --executor ray needs Ray, which is not installed here: ' \
                                              'pip install "autoresearch-mcp[ray]"'

# ---------------------------------------------------------------- locks


def test_lock_names_are_per_core_so_any_two_pools_agree():
    two = parse_devices("cpu:2", cores=[0, 1])
    one = parse_devices("cpu:1", cores=[0, 1])
    assert [s.locks for s in two] == [("cpu0",), ("cpu1",)]
    assert one[0].locks == ("cpu", "cpu0", "cpu1")  # the whole machine, and the lock earlier servers took


def test_two_servers_sharing_cpu_2_hold_at_most_two_slots():
    a, b = Pool(parse_devices("cpu:2", cores=[0, 1])), Pool(parse_devices("cpu:2", cores=[0, 1]))
    first, second = a.acquire(), b.acquire()
    assert first is not None and second is not None and first.slot != second.slot
    assert a.acquire() is None and b.acquire() is None  # flock: separate opens conflict, even in one process
    assert "busy" in str(b.busy_error())
    first.release()
    third = b.acquire()
    assert third is not None and third.slot == first.slot
    whole = Pool(parse_devices("cpu:1", cores=[0, 1]))
    assert whole.acquire() is None  # the whole machine waits for both cores
    second.release(), third.release()
    held = whole.acquire()
    assert held is not None and a.acquire() is None  # and then holds them both
    held.release()


def test_a_slot_is_taken_all_or_nothing():
    half = Pool(parse_devices("cpu:2", cores=[0, 1]))
    held = half.acquire()  # core 0
    whole = Pool(parse_devices("cpu:1", cores=[0, 1]))
    assert whole.acquire() is None
    other = half.acquire()  # core 1 must still be free: the failed whole-machine try let go of what it got
    assert other is not None
    held.release(), other.release()


def test_many_contenders_from_two_pools_never_exceed_two_at_once():
    pools = [Pool(parse_devices("cpu:2", cores=[0, 1])) for _ in range(2)]
    inside, most, guard = [0], [0], threading.Lock()

    def contend(p: Pool):
        for _ in range(40):
            held = p.acquire()
            if held is None:
                time.sleep(0.001)
                continue
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.002)
            with guard:
                inside[0] -= 1
            held.release()

    threads = [threading.Thread(target=contend, args=(pools[i % 2],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 2


HOLDER = """
import sys
from server.pool import Pool, parse_devices
held = Pool(parse_devices("cpu:2", cores=[0, 1])).acquire()
print(held.slot.name, flush=True)
sys.stdin.read()
"""


def test_a_slot_held_by_another_process_frees_itself_when_it_dies():
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "cpu:0"
        mine = Pool(parse_devices("cpu:2", cores=[0, 1]))
        held = mine.acquire()
        assert held.slot.name == "cpu:1" and mine.acquire() is None
    finally:
        holder.kill()
        holder.wait()
    again = mine.acquire()
    assert again is not None and again.slot.name == "cpu:0"
    held.release(), again.release()


# ---------------------------------------------------------------- the run's environment


def test_run_env_and_affinity_keep_a_run_on_its_slot():
    slot = parse_devices("cpu:2", cores=[0, 1])[1]
    env = pool.run_env({"PATH": "/bin", "OMP_NUM_THREADS": "8"}, slot)
    assert env["PATH"] == "/bin" and env["OMP_NUM_THREADS"] == "1"
    if not hasattr(os, "sched_setaffinity") or 1 not in os.sched_getaffinity(0):
        pytest.skip("no CPU affinity here")
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        pool.pin_to_cores(child.pid, slot)
        assert os.sched_getaffinity(child.pid) == {1}
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("busy, limit, threads", [
    ([100.0, 0.0], 2, 1),   # another program keeps one of two cores busy: one thread
    ([55.0, 50.0], 2, 1),
    ([20.0, 10.0], 2, 2),   # light background work: every core
    ([0.0, 0.0], 1, 1),     # never more than the slot's cores
    ([100.0, 100.0], 2, 1),  # never fewer than one
])
def test_a_cpu_runs_threads_are_the_cores_no_other_process_keeps_busy(monkeypatch, busy, limit, threads):
    monkeypatch.setattr(pool, "usable_cores", lambda: [0, 1])
    monkeypatch.setattr("psutil.cpu_percent", lambda interval, percpu: busy)
    assert pool.spare_threads(limit) == (threads, sum(busy) / 100)


# ---------------------------------------------------------------- runs on the pool: a stand-in harness

FINGERPRINT = "a" * 64
PROFILE = {"name": "smoke", "max_seq_len": 128, "time_budget": 5, "eval_tokens": 2**14, "vocab_size": 8192}
ROWS, TOKENS = 128, 2**14
# A stand-in harness with the real protocols (no torch): the feeder holds its socket until the trainer is gone, the
# evaluator scores the JSON "model" train.py hands over, and `--pins` fingerprints the cache's val file (the node's
# data check asks it).
FEEDER = """
import json, socket, sys
sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--fd") + 1]))
while True:
    try:
        if not sock.recv(4096):
            break
    except OSError:
        break
print(json.dumps({"phase": "ended", "training_seconds": 1.5, "tokens": 4096, "warmup_tokens": 0}), flush=True)
"""
EVALUATOR = f"""
import json, os, sys
if "--pins" in sys.argv:
    cache = sys.argv[sys.argv.index("--cache") + 1]
    print(json.dumps({{"harness": {{}}, "data": {{"val.bin": open(os.path.join(cache, "fingerprint")).read()}}}}))
    sys.exit(0)
request = json.loads(sys.stdin.readline())  # the request is one line; an early-started evaluator then waits for "go"
if request.get("wait"):
    sys.stdin.readline()
model = json.load(open(request["graph"]))
print("phase: evaluating", file=sys.stderr, flush=True)
print(json.dumps({{"ok": True, "profile": request["profile"], "dataset": request["dataset"], "rows_evaluated": {ROWS},
                  "tokens_evaluated": {TOKENS}, "val_fingerprint": request["pins"]["data"]["val.bin"], **model}}))
"""
FAKE = """
import json, os, sys, time
def result(val_bpb=0.9):
    with open(os.environ["AUTORESEARCH_HANDOVER"], "w") as f:
        json.dump({"val_bpb": val_bpb}, f)
"""
SUCCEED = """
print("phase: training", flush=True)
print("threads", os.environ.get("OMP_NUM_THREADS"), flush=True)
result(0.987)
"""
HANGS = """
print("phase: training", flush=True)
time.sleep(600)
"""


@pytest.fixture
def fake_ws(tmp_path):
    return stand_in_workspace(tmp_path / "ws", {"prepare.py": "# a stand-in\n", "feeder.py": FEEDER,
                                                "evaluator.py": EVALUATOR, "train.py": FAKE + SUCCEED},
                              ".autoresearch/\n")


@pytest.fixture
def cache(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "fingerprint").write_text(FINGERPRINT)
    return folder


def pins(ws, fingerprint=FINGERPRINT):
    return {"prepare_sha256": hashlib.sha256((ws / "training" / "prepare.py").read_bytes()).hexdigest(),
            "profile": dict(PROFILE), "val_fingerprint": FINGERPRINT,
            "amounts": {"rows_evaluated": ROWS, "tokens_evaluated": TOKENS},
            "evaluator": {"harness": {}, "data": {"val.bin": fingerprint}}}


def start(ws, cache, executor, source, run_id="r0001", fingerprint=FINGERPRINT, queue=False, manager=None):
    """Commit `source` as train.py and start it through a RunManager on `executor` (a new one unless given)."""
    (ws / "training" / "train.py").write_text(FAKE + textwrap.dedent(source))
    git(ws, "add", "training/train.py")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "experiment")
    mgr = manager or RunManager(ws, Ledger(ws), Git(ws), profile="smoke", dataset="sotu", cache=cache,
                                budget_seconds=5, device="cpu", executor=executor, isolation="none", queue=queue)
    mgr.start(run_id, git(ws, "rev-parse", "HEAD"), "test", seed=42, pins=pins(ws, fingerprint), session="t")
    return mgr


def test_a_run_that_finds_no_free_slot_is_queued_and_starts_when_one_frees(fake_ws, cache, monkeypatch):
    """cpu:1, queueing: the second run is recorded queued (no process, phase queued), starts when the first ends,
    and both succeed on the slot; a queued run cancelled before it started is recorded cancelled."""
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # threads set by hand: the slot's count, whatever the load
    executor = PoolExecutor(Pool(parse_devices("cpu:1", cores=[0, 1])))
    mgr = start(fake_ws, cache, executor, HANGS, run_id="r0001", queue=True)
    first = mgr.get("r0001")
    wait_until(lambda: "phase: training" in first.log_path.read_text())
    mgr = start(fake_ws, cache, executor, SUCCEED, run_id="r0002", manager=mgr)
    queued = mgr.get("r0002")
    assert Ledger(fake_ws).run("r0002")["status"] == "queued" and queued.popen is None
    assert mgr.progress("r0002")["phase"] == "queued"
    mgr = start(fake_ws, cache, executor, SUCCEED, run_id="r0003", manager=mgr)
    assert [h.run_id for h in mgr.in_flight()] == ["r0001", "r0002", "r0003"]
    assert mgr.cancel("r0003")["status"] == "cancelled"  # never started: nothing to kill
    assert Ledger(fake_ws).run("r0003")["status"] == "cancelled"
    mgr.cancel("r0001")
    second = anyio.run(mgr.wait, "r0002", 120, None)
    assert second["status"] == "succeeded" and second["device"] == "cpu" and second["executor"] == "local"
    statuses = [r["status"] for r in Ledger(fake_ws).records() if r.get("id") == "r0002" and r.get("status")]
    assert statuses[:2] == ["queued", "starting"] and statuses[-1] == "succeeded"
    assert "threads 2" in second_log(fake_ws, "r0002")  # the whole-machine slot's threads


SERVER = """
import json, sys, textwrap
sys.path.insert(0, {tests!r})
from pathlib import Path
import anyio
from server.pool import Pool, PoolExecutor, parse_devices
from support import stand_in_workspace
from test_pool import EVALUATOR, FAKE, FEEDER, start
ws, cache, source = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
stand_in_workspace(ws, {{"prepare.py": "# a stand-in\\n", "feeder.py": FEEDER, "evaluator.py": EVALUATOR,
                        "train.py": FAKE}}, ".autoresearch/\\n")
executor = PoolExecutor(Pool(parse_devices("cpu:2", cores=[0, 1])))
mgr = None
for i in range(1, 4):
    mgr = start(ws, cache, executor, source, run_id=f"r000{{i}}", queue=True, manager=mgr)
print(json.dumps([anyio.run(mgr.wait, f"r000{{i}}", 300, None)["status"] for i in range(1, 4)]), flush=True)
"""
OVERLAPS = """
print("phase: training", flush=True)
with open({spans!r}, "a") as f:
    f.write(f"start {{time.time()}}\\n")
time.sleep(1.5)
with open({spans!r}, "a") as f:
    f.write(f"end {{time.time()}}\\n")
result(0.9)
"""


def most_at_once(spans_file) -> int:
    events = sorted((float(t), kind == "start") for kind, t in (line.split() for line in spans_file.read_text().splitlines()))
    inside = most = 0
    for _, starts in events:  # an end and a start at the same instant: the end first (False sorts first)
        inside += 1 if starts else -1
        most = max(most, inside)
    return most


def test_two_servers_on_separate_workspaces_sharing_cpu_2_never_run_more_than_two_at_once(tmp_path, cache):
    """Two server processes, each with its own workspace and three runs to make on the same cpu:2 pool: six runs,
    never more than two training at any instant, and both slots used at once."""
    spans = tmp_path / "spans.txt"
    source = OVERLAPS.format(spans=str(spans))
    code = SERVER.format(tests=str(Path(__file__).parent))
    servers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"ws{i}"), str(cache), source],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [server.communicate(timeout=600) for server in servers]
    for server, (out, err) in zip(servers, outputs):
        assert server.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1]) == ["succeeded"] * 3
    assert spans.read_text().count("start") == 6
    assert most_at_once(spans) == 2


def second_log(ws, run_id: str) -> str:
    return (ws / ".autoresearch" / "runs" / run_id / "log.txt").read_text()


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.1)


# ---------------------------------------------------------------- the test: two candidates at once


def parallel_loop(workspace, cache, *flags) -> dict:
    """Through the tools of `serve --devices cpu:2 <flags>` (a stdio subprocess, as a client starts it): two
    candidates launched with max_wait_seconds=0 train at once (two runs in flight in status, each on its own slot),
    one is kept and the other rebased onto it. Real smoke runs. Returns the ledger's succeeded runs by id."""
    from mcp import Client

    from server.gitops import TRAIN
    from support import call, git, ledger_runs, serve_params

    train = workspace / TRAIN

    async def main():
        async with Client(serve_params(workspace, cache, 2.0, "--devices", "cpu:2", *flags)) as client:
            await call(client, "start_session", tag="pool")
            source = train.read_text()
            lines = [line for line in source.splitlines() if line.strip() and source.count(line) == 1]
            top, bottom = lines[0], lines[-1]
            idea_a = source.replace(top, top + "  # idea a")
            idea_b = source.replace(bottom, bottom + "  # idea b")
            await call(client, "write_train", content=idea_a)
            a = await call(client, "run_experiment", description="idea a", max_wait_seconds=0)
            await call(client, "write_train", content=idea_b)
            b = await call(client, "run_experiment", description="idea b", max_wait_seconds=0)
            both = {a["run_id"], b["run_id"]}
            seen_together = False
            for _ in range(600):  # until both train at the same moment (each run's startup takes a while)
                flying = (await call(client, "status"))["runs_in_flight"]
                running = [r for r in flying if r["status"] == "running"]
                if {r["run_id"] for r in running} == both:
                    assert {r["device"] for r in running} == {"cpu:0", "cpu:1"}  # one slot each
                    seen_together = True
                    break
                assert {r["run_id"] for r in flying} == both, flying  # neither ended before the other started
                await anyio.sleep(0.2)
            assert seen_together
            a = await call(client, "wait_for_run", run_id=a["run_id"])
            b = await call(client, "wait_for_run", run_id=b["run_id"])
            assert a["status"] == b["status"] == "succeeded", (a, b)
            await call(client, "keep", run_id=b["run_id"])
            assert git(workspace, "rev-parse", "HEAD") == b["commit"]
            rebased = await call(client, "rebase_run", run_id=a["run_id"])
            assert rebased["clean"] and train.read_text() == idea_b.replace(top, top + "  # idea a")
            runs = {r["run_id"]: r for r in (await call(client, "results"))["rows"]}
            assert runs[a["run_id"]]["device"] in ("cpu:0", "cpu:1")

    anyio.run(main)
    return {i: r for i, r in ledger_runs(workspace).items() if r.get("status") == "succeeded"}


def test_two_candidates_train_at_once_on_cpu_2_then_one_is_kept_and_the_other_rebased(workspace, prepared_cache):
    records = parallel_loop(workspace, prepared_cache).values()
    assert {r["executor"] for r in records} == {"local"} and all(r["node"] for r in records)
