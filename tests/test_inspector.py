"""A third-party client: the official MCP Inspector's CLI (npm) lists the tools and calls status over stdio."""

import json
import os
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


def test_inspector_starts_the_server_from_what_config_prints(workspace, prepared_cache):
    """`config json` as a client would use it: the command and args it prints, from a PATH without the venv."""
    printed = subprocess.run([sys.executable, "-m", "server.cli", "config", "json", "--workspace", str(workspace),
                              "--profile", "smoke", "--dataset", "sotu", "--cache", str(prepared_cache)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    entry = json.loads(printed)["mcpServers"]["autoresearch"]
    node_dir = str(Path(shutil.which("node")).parent)
    done = subprocess.run([str(INSPECTOR), "--cli", entry["command"], *entry["args"], "--method", "tools/call",
                           "--tool-name", "status"], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent, env={**os.environ, "PATH": f"{node_dir}:/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)["structuredContent"]
    assert status["workspace"] == str(workspace) and status["data_ready"] is True
