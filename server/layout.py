"""The workspace layout, named once: where the server keeps its state, each run's files, and the machine-wide
device locks. Every other module asks here instead of spelling a path."""

import os
from pathlib import Path

STATE_DIR = ".autoresearch"          # git-ignored server state inside the workspace
LEDGER_NAME = "ledger.jsonl"         # the source of truth (server/ledger.py)
RESULTS_NAME = "results.tsv"         # upstream's view of the ledger, in the workspace root
TSV_HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
RUNS_DIR = "runs"                    # .autoresearch/runs/<run id>/
LOG_NAME = "log.txt"                 # a run's stdout and stderr
RESULT_NAME = "result.json"          # what evaluate_bpb writes when run by hand; never read by the server
HANDOVER_NAME = "model.graph"        # the model train.py hands over to the evaluator (training/handover.py)
FEEDER_STATUS_SUFFIX = ".feeder.json"  # runs/<run id>.feeder.json: the feeder's figures, outside the run dir
COMPILE_CACHE_NAME = "compile-cache"  # torch.compile's caches kept across runs, bound into the trainer's sandbox
EVALUATOR_COMPILE_NAME = "evaluator-compile"  # the evaluator's compiled kernels: hidden from every trainer
RUN_TRAIN_NAME = "train.py"          # the run's own copy of train.py, taken from its commit
WORKSPACE_LOCK_NAME = "workspace.lock"  # held around every state change (server/wslock.py)
SERVER_LOCK_NAME = "server.lock"     # held by the one server serving this workspace
RESULT_ENV = "AUTORESEARCH_RESULT_FILE"  # the trainer's result file (run by hand); every run process carries it
LOCK_DIR_ENV = "AUTORESEARCH_LOCK_DIR"  # where the device locks live; tests point it at a private folder


def state_dir(workspace: Path) -> Path:
    return Path(workspace) / STATE_DIR


def run_dir(workspace: Path, run_id: str) -> Path:
    return state_dir(workspace) / RUNS_DIR / run_id


def log_path(workspace: Path, run_id: str) -> Path:
    return run_dir(workspace, run_id) / LOG_NAME


def result_path(workspace: Path, run_id: str) -> Path:
    return run_dir(workspace, run_id) / RESULT_NAME


def handover_path(workspace: Path, run_id: str) -> Path:
    return run_dir(workspace, run_id) / HANDOVER_NAME


def feeder_status_path(workspace: Path, run_id: str) -> Path:
    """Beside the run dir, not in it: the sandbox hides the state dir except the run's own folder."""
    return state_dir(workspace) / RUNS_DIR / (run_id + FEEDER_STATUS_SUFFIX)


def compile_cache_dir(workspace: Path) -> Path:
    return state_dir(workspace) / COMPILE_CACHE_NAME


def evaluator_compile_dir(workspace: Path) -> Path:
    return state_dir(workspace) / EVALUATOR_COMPILE_NAME


def device_lock_dir() -> Path:
    """One home for the device locks on this machine, whatever workspace or data cache a server uses: a local
    (never network) folder for this user, so two of their servers never train on one device at once. Point
    AUTORESEARCH_LOCK_DIR at a folder every user can write to share devices between users."""
    override = os.environ.get(LOCK_DIR_ENV)
    if override:
        return Path(override).expanduser()
    # a fixed place, not $TMPDIR or $XDG_RUNTIME_DIR: a server started from a service and one started from a shell
    # must find the same lock files
    return Path("/tmp") / f"autoresearch-{os.getuid()}" / "locks"
