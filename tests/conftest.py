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

# The long end-to-end tests: each trains several real runs through the whole trusted pipeline (minutes apiece on
# two cores). The default run leaves them out (pyproject's addopts: -m "not slow") so CI stays under its time
# limit; `pytest -q -n 3 -m slow` runs them. What they prove is also proven faster in the default run: the loop
# through the tools (test_candidates, test_pool), the pipeline and the sandbox (test_cheats' TINY cases,
# test_sandbox), races and crashes (test_faults' other cases).
SLOW = {
    "test_demo.py": ["test_demo_runs_the_loop_end_to_end", "test_the_readmes_demo_completes_with_one_core_kept_busy"],
    "test_stdio.py": ["test_full_loop_over_stdio"],
    "test_candidates.py": ["test_the_parallel_loop_through_the_tools"],
    "test_runs.py": ["test_the_real_pipeline_scores_a_sandboxed_run_and_ignores_a_forged_result_file",
                     "test_the_real_pipeline_runs_with_isolation_none"],
    "test_dashboard.py": ["test_dashboard_in_a_browser"],
    "test_tools.py": ["test_full_loop_baseline_keep_edit_run_discard", "test_crashed_run_needs_no_decision"],
    # the cheats on the real train.py (the harness and record cheats run in the default suite, on TINY)
    "test_cheats.py": ["test_training_on_the_val_split_through_the_loader", "test_training_past_the_budget",
                       "test_a_non_causal_model_cannot_improve_the_score"],
    "test_faults.py": ["test_kill_9_at_any_instant_of_a_start_leaves_ledger_git_and_device_lock_in_agreement",
                       "test_keep_and_discard_of_one_run_at_once_exactly_one_wins",
                       "test_a_second_server_on_one_workspace_refuses_to_start",
                       "test_a_printed_val_bpb_is_never_recorded",
                       "test_an_edit_during_a_run_does_not_change_what_runs"],
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.originalname in SLOW.get(item.path.name, ()):
            item.add_marker(pytest.mark.slow)
