"""Helpers the tests share: a git query, a workspace of stand-in harness files, the server as a stdio subprocess, a
tool call that must succeed, the ledger read independently, whether a device's machine-wide lock is free, and
waiting for a server process to listen."""

import fcntl
import json
import os
import socket
import subprocess
import sys
import time

from mcp import StdioServerParameters

from server.executor import lock_path
from server.layout import LOCK_DIR_ENV


def git(workspace, *args) -> str:
    return subprocess.run(["git", "-C", str(workspace), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def stand_in_workspace(ws, training: dict[str, str], gitignore: str):
    """A git repository at ws holding training/<name> = text for each entry (stand-ins for the harness and
    train.py) and a .gitignore, committed once on main."""
    (ws / "training").mkdir(parents=True)
    for name, text in training.items():
        (ws / "training" / name).write_text(text)
    (ws / ".gitignore").write_text(gitignore)
    git(ws, "init", "-q", "-b", "main")
    git(ws, "add", "-A")
    git(ws, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    return ws


def server_env(home) -> dict:
    """The environment of a server started as a subprocess: little more than PATH, plus the tests' own device lock
    folder (HOME falls back to `home`)."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(home)),
            LOCK_DIR_ENV: os.environ[LOCK_DIR_ENV]}


def serve_params(workspace, cache, budget, *flags, env=None) -> StdioServerParameters:
    """`autoresearch-mcp serve` as a stdio subprocess on the smoke profile and sotu, with `flags` added (for
    `Client(...)` or `stdio_client(...)`); its environment is `env`, else this process's."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "server.cli", "serve", "--workspace", str(workspace), "--profile", "smoke", "--dataset", "sotu",
              "--cache", str(cache), "--time-budget", str(budget), *flags],
        env=dict(os.environ) if env is None else env)


async def call(client, name, **arguments) -> dict:
    """Call a tool that must succeed; returns its structured answer."""
    result = await client.call_tool(name, arguments)
    assert not result.is_error, result.content[0].text
    return result.structured_content


def ledger_runs(workspace) -> dict:
    """Run records folded by id, read straight from the file rather than through the server's reader. Only the
    last line may be unreadable (a server may be appending it right now); any other bad line fails the test."""
    *complete, partial = (workspace / ".autoresearch" / "ledger.jsonl").read_text().split("\n")
    runs = {}
    for line in complete:
        record = json.loads(line)
        if record.get("type") == "run":
            runs.setdefault(record["id"], {}).update(record)
    return runs


def device_lock_is_free(device: str = "cpu") -> bool:
    """Whether the machine-wide lock of this device (in the tests' own folder, AUTORESEARCH_LOCK_DIR) is free."""
    path = lock_path(device)
    if not path.exists():
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def wait_for_port(process, port: int, timeout: float = 60.0) -> None:
    """Until something listens on 127.0.0.1:port; the server process must stay alive meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.2)
