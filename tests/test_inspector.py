"""A third-party client: the official MCP Inspector's CLI (npm) lists the tools and calls status over stdio."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


INSPECTOR = Path(__file__).parent.parent / "node_modules" / ".bin" / "mcp-inspector"

pytestmark = pytest.mark.skipif(
    not INSPECTOR.exists() or shutil.which("node") is None,
    reason="needs `npm install` (the README's set-up installs it in CI)",
)


def inspect(workspace, cache, *method) -> dict:
    serve = [sys.executable, "-m", "server.cli", "serve", "--workspace", str(workspace), "--profile", "smoke",
             "--dataset", "sotu", "--cache", str(cache)]
    done = subprocess.run([str(INSPECTOR), "--cli", *serve, *method], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_inspector_lists_tools_and_calls_status(workspace, prepared_cache):
    tools = inspect(workspace, prepared_cache, "--method", "tools/list")["tools"]
    assert {"status", "run_experiment", "keep", "discard"} <= {t["name"] for t in tools}
    status = inspect(workspace, prepared_cache, "--method", "tools/call", "--tool-name", "status")
    assert status["isError"] is False
    assert status["structuredContent"]["data_ready"] is True
    assert status["structuredContent"]["profile"]["name"] == "smoke"
