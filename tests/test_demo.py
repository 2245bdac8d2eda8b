"""The README's main command: `autoresearch-mcp demo` drives the real server through the loop and reports."""

import os
import re
import subprocess
import sys

import pytest

from support import ledger_runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prepared_cache):
    """One demo run shared by this file's tests: a baseline and two ideas on the smoke profile."""
    workspace = tmp_path_factory.mktemp("demo") / "ws"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", "--dir", str(workspace), "--profile", "smoke",
         "--time-budget", "2", "--experiments", "2", "--cache", str(prepared_cache)],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    done.workspace = workspace
    return done


def test_demo_runs_the_loop_end_to_end(demo):
    done, workspace = demo, demo.workspace
    assert done.returncode == 0, done.stderr[-3000:]
    assert "session demo" in done.stdout and "best: r000" in done.stdout
    runs = ledger_runs(workspace)
    assert len(runs) == 3 and all(r["status"] == "succeeded" and r["decision"] for r in runs.values())
    assert (workspace / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((workspace / "results.tsv").read_text().splitlines()) == 4


def progress_phases(output: str) -> list[list[tuple[str, int]]]:
    """Each run's progress line, as (phase, percent) states in the order it showed them (tqdm rewrites the line
    with \r; consecutive repeats collapsed)."""
    runs, current = [], None
    for piece in re.split(r"[\r\n]", output):
        if piece.startswith("> run_experiment"):
            current = []
            runs.append(current)
        match = re.match(r"\s+([a-z-]+)\s+\|.*\|\s+(\d+)%", piece)
        if match and current is not None:
            state = (match.group(1), int(match.group(2)))
            if not current or current[-1] != state:
                current.append(state)
    return runs


def test_demo_progress_passes_through_the_phases_to_100_percent_and_says_what_next(demo):
    order = ["starting", "compiling", "warm-up", "training", "exporting", "evaluating", "done"]
    runs = progress_phases(demo.stdout)
    assert len(runs) == 3
    for states in runs:
        phases = [phase for phase, _ in states]
        assert set(phases) <= set(order), phases
        assert phases == sorted(phases, key=order.index), phases  # never backwards
        assert phases[0] == "starting" and "training" in phases and "evaluating" in phases, phases
        assert states[-1] == ("done", 100)
    assert "autoresearch-mcp config claude --workspace" in demo.stdout  # the closing lines: connect an agent
    assert "autoresearch-mcp dashboard --workspace" in demo.stdout


def test_a_failed_run_is_explained_before_train_py_is_blamed():
    from server.demo import failure_text

    timed_out = failure_text({"run_id": "r0002", "status": "timed_out", "log_tail": "step 3\neval: 40/80 rows",
                              "error": "the evaluating phase ran past its 300 s limit and the run was stopped. The "
                                       "likely cause is a busy machine ..."})
    lines = timed_out.splitlines()
    assert lines[0].startswith("run r0002 timed_out: the evaluating phase ran past its 300 s limit")
    assert "AUTORESEARCH_WATCHDOG_FACTOR=3 autoresearch-mcp demo" in lines[1]
    assert lines[-1] == "  eval: 40/80 rows"
    crashed = failure_text({"run_id": "r0003", "status": "crashed", "error": "exit 1", "log_tail": None})
    assert "busy" in crashed and crashed.index("busy") < crashed.index("train.py")


def test_the_readmes_demo_completes_with_one_core_kept_busy(tmp_path, prepared_cache):
    """The README's own demo (cpu profile, its defaults) while another program keeps a core busy, as on a laptop
    doing other work: it used to be killed by a single run-wide timeout blaming train.py. Long: in SLOW."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        done = subprocess.run([sys.executable, "-m", "server.cli", "demo", "--dir", str(tmp_path / "ws"),
                               "--cache", str(prepared_cache)],
                              capture_output=True, text=True, timeout=2400, env={**os.environ})
    finally:
        hog.kill()
        hog.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    runs = ledger_runs(tmp_path / "ws")
    assert len(runs) == 2 and all(r["status"] == "succeeded" for r in runs.values()), runs
