"""The Ray executor (server/ray_executor.py) on a private local Ray instance (`--ray-address local`): a run trains
in a Ray actor on the node and comes back with its log, result, executor, node and device; a Ray worker killed
mid-run is recorded `interrupted` naming the node; cancel takes the node's processes down; a node whose prepared
data is not the session's refuses in words naming the prepare command; no Ray, one line with the pip command.

Fake train.py files (plain Python, no torch) keep it cheap; one Ray instance serves the whole module.
"""

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import anyio
import psutil
import pytest

from server import ray_executor
from server.errors import WorkspaceError
from server.pool import Pool, parse_devices
from test_pool import HANGS, SUCCEED, cache, fake_ws, start, wait_until  # noqa: F401 (cache, fake_ws: fixtures)

# The dev extra brings Ray, so the README's test command exercises this module; only an install without the extra
# skips it, never CI (a broken Ray there fails the module instead of passing it silently).
ray = __import__("ray") if os.environ.get("CI") else pytest.importorskip("ray")


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    """One private Ray instance for the module, behind a cpu:2 pool of this machine."""
    pool = Pool(parse_devices("cpu:2", cores=[0, 1]))
    started = time.monotonic()
    ex = ray_executor.RayExecutor(pool, ray_executor.LOCAL)
    print(f"local Ray instance up in {time.monotonic() - started:.1f} s at {ex.address}")
    yield ex
    ex.close()


def node_processes(marker: str) -> list[psutil.Process]:
    """Processes on this (the only) node whose command line names the marker."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def trainers(run_id: str) -> list[psutil.Process]:
    """The run's train.py process on the node (its node-side launcher names train.py too)."""
    return [p for p in node_processes(f"{ray_executor.NODE_DIR_PREFIX}{run_id}-")
            if p.info["cmdline"][-1].endswith("train.py") and "server.launcher" not in p.info["cmdline"]]


def node_dirs(run_id: str) -> list[Path]:
    """The run's folder on the node (its train.py, log and hand-over), in the node's temp folder."""
    return list(Path(tempfile.gettempdir()).glob(f"{ray_executor.NODE_DIR_PREFIX}{run_id}-*"))


def test_a_run_trains_on_a_ray_node_and_records_executor_node_and_device(fake_ws, cache, executor):
    # run ids unique to each test, and never a real session's (r0001, ...): the node's processes are found by name
    mgr = start(fake_ws, cache, executor, SUCCEED, run_id="r9001")
    record = anyio.run(mgr.wait, "r9001", 120, None)
    log = (fake_ws / ".autoresearch" / "runs" / "r9001" / "log.txt").read_text()
    assert record["status"] == "succeeded", log
    assert record["val_bpb"] == 0.987
    assert f"running on Ray node {socket.gethostname()}" in log
    assert "threads 1" in log  # the slot's torch threads reached the trainer on the node
    assert (record["executor"], record["node"]) == ("ray", socket.gethostname())
    assert record["device"] in ("cpu:0", "cpu:1")  # the slot it was placed on (a GPU node names its GPU)
    assert record["official"]["node"] == socket.gethostname()
    wait_until(lambda: not node_dirs("r9001"))  # the node keeps nothing of a finished run


def test_killing_the_ray_worker_mid_run_records_interrupted_naming_the_node(fake_ws, cache, executor):
    mgr = start(fake_ws, cache, executor, HANGS, run_id="r9002")
    handle = mgr.get("r9002")
    wait_until(lambda: "phase: training" in handle.log_path.read_text())
    (trainer,) = trainers("r9002")
    node_launcher = trainer.parent()
    worker = node_launcher.parent()
    assert worker.name().startswith("ray::") or "ray" in " ".join(worker.cmdline())
    worker.kill()  # the Ray worker dies under the run, as it would with its node
    record = anyio.run(mgr.wait, "r9002", 120, None)
    assert record["status"] == "interrupted", record
    assert socket.gethostname() in record["error"] and "Ray worker" in record["error"]
    assert record["node"] == socket.gethostname() and record["executor"] == "ray"
    wait_until(lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, timeout=60)
    wait_until(lambda: not node_dirs("r9002"), timeout=60)


def test_cancel_kills_the_run_on_its_node(fake_ws, cache, executor):
    mgr = start(fake_ws, cache, executor, HANGS, run_id="r9003")
    handle = mgr.get("r9003")
    wait_until(lambda: "phase: training" in handle.log_path.read_text())
    (trainer,) = trainers("r9003")
    record = mgr.cancel("r9003")
    assert record["status"] == "cancelled"
    wait_until(lambda: not trainer.is_running() or trainer.status() == psutil.STATUS_ZOMBIE, timeout=60)
    wait_until(lambda: not node_dirs("r9003"), timeout=60)


def test_a_node_with_other_data_refuses_naming_the_prepare_command(fake_ws, cache, executor):
    mgr = start(fake_ws, cache, executor, SUCCEED, run_id="r0004", fingerprint="b" * 64)
    record = anyio.run(mgr.wait, "r0004", 120, None)
    assert record["status"] == "crashed"
    log = (fake_ws / ".autoresearch" / "runs" / "r0004" / "log.txt").read_text()
    assert "differs from the session's" in log and "autoresearch-mcp prepare --dataset sotu --profile smoke" in log
    assert "autoresearch-mcp prepare --dataset sotu" in record["error"]


def test_without_ray_the_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(WorkspaceError) as missing:
        ray_executor.RayExecutor(Pool(parse_devices("cpu:1", cores=[0])), ray_executor.LOCAL)
    assert str(missing.value).count("\n") == 0 and 'pip install "autoresearch-mcp[ray]"' in str(missing.value)


def test_two_candidates_train_at_once_through_ray_local_then_one_is_kept_and_the_other_rebased(
        workspace, prepared_cache):
    """The issue's test through `serve --devices cpu:2 --executor ray --ray-address local`: the same loop as on the
    local pool; the private Ray instance goes with the server."""
    from test_pool import parallel_loop

    records = parallel_loop(workspace, prepared_cache, "--executor", "ray", "--ray-address", "local").values()
    assert {(r["executor"], r["node"]) for r in records} == {("ray", socket.gethostname())}
    server_pid = {r["server_pid"] for r in records}.pop()
    wait_until(lambda: not [p for p in psutil.process_iter(["cmdline"]) if "server.ray_executor" in
                            (p.info["cmdline"] or []) and str(server_pid) in (p.info["cmdline"] or [])])
