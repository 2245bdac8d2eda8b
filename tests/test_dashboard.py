"""The live dashboard in a real browser: headless Chromium renders the page (its JavaScript included) against a
workspace with real runs, while one is in progress and after; the DOM it leaves is what a person would see.
(docs/dashboard.png, the README's picture, is made by docs/dashboard_screenshot.py the same way.)
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import pytest
from mcp import Client

from support import call, serve_params, wait_for_port

TOKEN = "dashboard-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_VIRTUAL_MS = 5000  # virtual time the page gets to fetch and render (a couple of polls)
# A run that stays in progress until cancelled: the test then sees it live, however busy the machine is.
STALL = "import time as _t; _t.sleep(3600)  # dashboard test: stay in progress\n"
CRASH = "raise RuntimeError('dashboard test: a deliberate crash')\n"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def browser(tmp_path: Path, url: str, *extra: str) -> str:
    """Load the page in headless Chromium; its DOM after the page's own JavaScript ran."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,1500",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--virtual-time-budget={BROWSER_VIRTUAL_MS}",
         *extra, url],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def rows(dom: str) -> dict[str, str]:
    """run id -> the text of its results row."""
    found = re.findall(r'<tr data-run="(r\d+)"[^>]*>(.*?)</tr>', dom, re.S)
    return {run_id: re.sub(r"<[^>]+>", " ", html) for run_id, html in found}


@pytest.fixture
def dashboard(workspace, tmp_path):
    """`autoresearch-mcp dashboard` with a bearer token; yields its URL as it printed it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "dashboard", "--workspace", str(workspace), "--port", str(port)],
        env={**os.environ, "AUTORESEARCH_TOKEN": TOKEN}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first_line = process.stderr.readline()
    url = re.search(r"http://\S+/", first_line)
    assert url and url.group(0) == f"http://127.0.0.1:{port}/", first_line
    wait_for_port(process, port)
    yield url.group(0)
    process.terminate()
    process.wait(timeout=10)


def test_dashboard_in_a_browser(workspace, prepared_cache, dashboard, tmp_path):
    page = f"{dashboard}?token={TOKEN}"
    # read-only and guarded: no token, a foreign Host, or a write are all refused
    assert fetch(dashboard + "api/state", token=None)[0] == 401
    assert fetch(dashboard + "api/state", token="wrong")[0] == 401
    request = urllib.request.Request(dashboard + "api/state", method="POST", data=b"{}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 405
    status, body = fetch(dashboard)
    assert status == 200 and b"<title>autoresearch dashboard</title>" in body
    assert b"http://" not in body.replace(b"http://www.w3.org", b"")  # nothing is fetched from elsewhere

    empty = browser(tmp_path, page, "--dump-dom")
    assert "no research session yet" in empty and "No runs yet." in empty

    params = serve_params(workspace, prepared_cache, 1)
    train = workspace / "training" / "train.py"
    seen = {}

    async def drive():
        async with Client(params) as client:
            await call(client, "start_session", tag="dash")
            baseline = await call(client, "run_experiment", description="baseline")
            await call(client, "keep", run_id=baseline["run_id"])
            source = train.read_text()
            await call(client, "write_train", content=CRASH + source)
            second = await call(client, "run_experiment", description="a broken idea")
            assert second["status"] == "crashed", second
            await call(client, "discard", run_id=second["run_id"])
            assert train.read_text() == source
            await call(client, "write_train", content=STALL + source)
            third = await call(client, "run_experiment", description="a run to watch", max_wait_seconds=0)
            assert third["status"] in ("starting", "running"), third

            # live: the page shows the run in progress with its phase and a progress bar
            state = json.loads(fetch(dashboard + "api/state")[1])
            assert state["running"]["run_id"] == third["run_id"] and state["running"]["phase"] == "starting"
            seen["live"] = browser(tmp_path, page + "#r0001", "--dump-dom")
            seen["shot"] = tmp_path / "dashboard.png"
            browser(tmp_path, page + "#r0002", f"--screenshot={seen['shot']}")
            await call(client, "cancel_run", run_id=third["run_id"])
            seen["ids"] = [baseline["run_id"], second["run_id"], third["run_id"]]

    anyio.run(drive)

    live = seen["live"]
    assert 'id="phase" data-phase="starting"' in live
    assert re.search(r'id="bar" style="width:\s*0%', live)
    assert 'class="now" data-phase="starting"' in live and "a run to watch" in live
    shown = rows(live)
    assert set(shown) == set(seen["ids"])
    assert "keep" in shown["r0001"] and "baseline" in shown["r0001"]
    assert "crashed" in shown["r0002"] and "discard" in shown["r0002"] and "deliberate crash" in shown["r0002"]
    assert "running" in shown["r0003"] or "starting" in shown["r0003"]
    assert "Run r0001" in live and "unchanged from the kept version" in live  # the baseline's diff is empty
    assert re.search(r'<img id="chart-img"[^>]*src="blob:', live)
    assert "not measured" in live  # no noise floor yet
    assert seen["shot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    after = browser(tmp_path, page + "#r0002", "--dump-dom")
    assert "No run in progress." in after
    assert "cancelled" in rows(after)["r0003"]
    assert "Run r0002" in after and "+raise RuntimeError('dashboard test: a deliberate crash')" in after  # its diff


def test_state_carries_delta_sigma_and_the_noise_floor(workspace):
    """Δ against the best kept run before each run, in units of the measured noise, straight from the ledger."""
    from server.dashboard import Board
    from server.ledger import Ledger

    ledger = Ledger(workspace)
    ledger.append({"type": "session", "tag": "t", "branch": "main", "base_commit": "0" * 40, "profile": "smoke",
                   "dataset": "sotu"})
    runs = [("r0001", "succeeded", "keep", 2.0), ("r0002", "succeeded", "keep", 1.9), ("r0003", "succeeded",
            "discard", 1.905), ("r0004", "timed_out", None, None), ("r0005", "succeeded", "discard", 2.5)]
    for run_id, status, decision, bpb in runs:
        ledger.append({"type": "run", "id": run_id, "session": "t", "commit": "a" * 40, "status": status,
                       "decision": decision, "val_bpb": bpb, "description": run_id})
    ledger.append({"type": "noise", "profile": "smoke", "dataset": "sotu", "commit": "b" * 40,
                   "values": [1.9, 1.92, 1.91], "mean": 1.91, "std": 0.01})
    state = Board(workspace).state()
    by_id = {r["run_id"]: r for r in state["runs"]}
    assert by_id["r0001"]["delta"] is None  # the first kept run is the baseline
    assert by_id["r0002"]["delta"] == pytest.approx(-0.1) and by_id["r0002"]["sigma"] == pytest.approx(-10)
    assert by_id["r0003"]["delta"] == pytest.approx(0.005) and by_id["r0003"]["within_noise"] is True
    assert by_id["r0004"]["status"] == "timed_out" and by_id["r0004"]["delta"] is None
    assert by_id["r0005"]["within_noise"] is False
    assert state["best"] == {"run_id": "r0002", "val_bpb": 1.9}
    assert state["noise"]["std"] == 0.01 and state["noise"]["repeats"] == 3
    assert state["running"] is None and state["session"]["tag"] == "t"
