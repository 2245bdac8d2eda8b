"""The README's main command: `autoresearch-mcp demo` drives the real server through the loop and reports."""

import os
import subprocess
import sys

from support import ledger_runs


def test_demo_runs_the_loop_end_to_end(tmp_path, prepared_cache):
    workspace = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "demo", "--dir", str(workspace), "--profile", "smoke",
         "--time-budget", "2", "--experiments", "2", "--cache", str(prepared_cache)],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "session demo" in done.stdout and "best: r000" in done.stdout
    runs = ledger_runs(workspace)
    assert len(runs) == 3 and all(r["status"] == "succeeded" and r["decision"] for r in runs.values())
    assert (workspace / "progress.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((workspace / "results.tsv").read_text().splitlines()) == 4
