"""The harness contract: what the frozen harness (training/prepare.py, runtime.py, prepare_data.py) promises the
server, and how the server holds it to that.

- describe: `prepare.py --describe`, asked in a subprocess so the server never imports torch or the harness;
- the environment a run starts with, built from scratch;
- pins: what must not change during a session (the harness files' sha256, the profile's constants, the val data,
  the rows and tokens an evaluation scores);
- the result: the file evaluate_bpb writes, read and checked against the pins.
"""

import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from server.errors import WorkspaceError
from server.gitops import TRAIN

PREPARE = "training/prepare.py"
HARNESS_DIR = "training"
HARNESS_FILES = (PREPARE, "training/runtime.py", "training/prepare_data.py", "training/feeder.py", "training/handover.py",
                 "training/evaluator.py")  # pinned where present
DESCRIBE_TIMEOUT = 120  # seconds for `prepare.py --describe` (imports torch, hashes the val file)
PINNED_CONSTANTS = ("max_seq_len", "eval_tokens", "vocab_size")
# result-file key -> describe key: how much an evaluation scored must be exactly what the harness announced
PINNED_AMOUNTS = {"tokens_evaluated": "eval_tokens_scored", "rows_evaluated": "eval_rows"}
MAX_EPOCHS = 4  # more passes over the training data per budget than this and val_bpb measures memorisation
RESULT_ENV = "AUTORESEARCH_RESULT_FILE"
# Variables a training process inherits from the server when set; everything else is built from scratch.
PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS",
               "HF_HOME", "LD_LIBRARY_PATH", "CUDA_HOME")
PASSTHROUGH_PREFIXES = ("HIP", "PYTORCH_", "ROCR_", "TRITON_", "TORCHINDUCTOR_")


# ---- the run environment


def training_env(workspace: Path, *, profile: str | None, dataset: str | None, cache: Path | None,
                 budget: float | None, result_file: Path, seed: int | None) -> dict:
    """The complete environment of a training run, built from scratch rather than copied from the server's:
    the server alone picks profile, dataset, budget and result file, and nothing else leaks in. The harness
    folder is on PYTHONPATH, so a train.py copied into its run folder still imports prepare and runtime.
    None leaves a setting to prepare.py's default; relative paths are taken from the workspace."""
    return _clean_env(workspace, profile, dataset, cache, budget,
                      **{RESULT_ENV: Path(workspace, result_file)}, AUTORESEARCH_SEED=seed,
                      PYTHONPATH=Path(workspace, HARNESS_DIR).resolve())


def _clean_env(workspace: Path, profile, dataset, cache, budget, **more) -> dict:
    env = {k: v for k, v in os.environ.items() if k in PASSTHROUGH or k.startswith(PASSTHROUGH_PREFIXES)}
    settings = {"AUTORESEARCH_PROFILE": profile, "AUTORESEARCH_DATASET": dataset,
                "AUTORESEARCH_CACHE": None if cache is None else Path(workspace, cache),
                "AUTORESEARCH_TIME_BUDGET": None if budget is None else f"{budget:g}", **more}
    env.update({k: str(v) for k, v in settings.items() if v is not None})
    env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    return env


# ---- describe


def describe_harness(workspace: Path, profile: str | None, dataset: str | None, cache: Path | None,
                     budget: float | None = None) -> dict:
    """What the frozen harness will use (profile constants, dataset, readiness, val fingerprint, evaluation size),
    asked of prepare.py itself in a subprocess."""
    if not (Path(workspace) / PREPARE).is_file():
        raise WorkspaceError(f"{workspace} has no {PREPARE}: is it an autoresearch workspace? "
                             "Create one with `autoresearch-mcp init DIR`.")
    cmd = [sys.executable, PREPARE, "--describe"]
    cmd += [f"--profile={profile}"] if profile else []
    cmd += [f"--dataset={dataset}"] if dataset else []
    env = _clean_env(workspace, profile, dataset, cache, budget)
    by_hand = f"cd {shlex.quote(str(workspace))} && " + shlex.join(
        [*(f"{k}={v}" for k, v in env.items() if k.startswith("AUTORESEARCH_")), *cmd])
    try:
        proc = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=DESCRIBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise WorkspaceError(f"prepare.py --describe did not answer within {DESCRIBE_TIMEOUT} s. "
                             f"Run it by hand to see why: {by_hand}") from None
    if proc.returncode:
        raise WorkspaceError(f"prepare.py --describe failed (exit {proc.returncode}):\n{_tail(proc.stderr)}\n"
                             f"Run it by hand to see the whole output: {by_hand}")
    try:
        described = json.loads(proc.stdout)
    except ValueError:
        described = None
    if not isinstance(described, dict):
        raise WorkspaceError(f"prepare.py --describe did not print one JSON object on stdout; it printed:\n"
                             f"{_tail(proc.stdout)}\nRun it by hand: {by_hand}")
    return described


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])[-3000:]


def warnings(describe: dict) -> list[str]:
    """What the agent should know about the set-up before trusting its numbers."""
    found = []
    epochs = describe.get("epochs_per_budget")
    if isinstance(epochs, (int, float)) and not isinstance(epochs, bool) and epochs > MAX_EPOCHS:
        found.append(f"one training budget passes over the {describe.get('dataset')} training data about "
                     f"{epochs:.0f} times (more than {MAX_EPOCHS}): val_bpb will reward memorising it. Prepare a "
                     "larger dataset (e.g. `autoresearch-mcp prepare --dataset climbmix`) or shorten the budget.")
    return found


# ---- pins


def harness_sha256(workspace: Path) -> dict[str, str]:
    """{path: sha256} of every harness file present in the workspace."""
    hashes = {}
    for name in HARNESS_FILES:
        try:
            hashes[name] = hashlib.sha256((Path(workspace) / name).read_bytes()).hexdigest()
        except FileNotFoundError:
            continue
    return hashes


def prepare_sha256(workspace: Path) -> str | None:
    """The sha256 of training/prepare.py's bytes (None when it is missing)."""
    return harness_sha256(workspace).get(PREPARE)


def harness_pins(workspace: Path, describe: dict) -> dict:
    """What must not change during a session."""
    return {"prepare_sha256": prepare_sha256(workspace), "harness_sha256": harness_sha256(workspace),
            "profile": describe["profile"], "val_fingerprint": describe.get("val_fingerprint"),
            "amounts": {key: describe[source] for key, source in PINNED_AMOUNTS.items()
                        if isinstance(describe.get(source), int)}}


def harness_changes(workspace: Path, pins: dict) -> list[str]:
    """The harness files whose bytes differ from the pins (a session pinned before harness_sha256 existed
    pins prepare.py alone)."""
    now = harness_sha256(workspace)
    pinned = pins.get("harness_sha256")
    if pinned is None:
        pinned, now = {PREPARE: pins.get("prepare_sha256")}, {PREPARE: now.get(PREPARE)}
    return [name for name in sorted(set(pinned) | set(now)) if pinned.get(name) != now.get(name)]


def restore_hint(changed: list[str], commit: str | None = None) -> str:
    source = f"{commit[:12]} " if commit else ""
    return f"`git checkout {source}-- {' '.join(changed)}`"


# ---- the result


def read_result(workspace: Path, path: Path, started: float, pins: dict) -> tuple[dict | None, str | None]:
    """The result file evaluate_bpb wrote during this run, checked against the session's pins:
    (result, None) or (None, why it does not count)."""
    try:
        stat = path.stat()
        result = json.loads(path.read_text())
    except FileNotFoundError:
        return None, (f"no val_bpb: evaluate_bpb never wrote the result file ({TRAIN} must call prepare's "
                      "evaluate_bpb at the end; a printed val_bpb does not count)")
    except ValueError as e:
        return None, f"no val_bpb: the result file is not valid JSON ({e})"
    if stat.st_mtime < started - 1:  # deleted before the start, so this is clock trouble or tampering
        return None, "no val_bpb: the result file predates the run"
    val_bpb = result.get("val_bpb") if isinstance(result, dict) else None
    if not isinstance(val_bpb, (int, float)) or isinstance(val_bpb, bool) or not math.isfinite(val_bpb):
        return None, f"no valid val_bpb in the result file (got {val_bpb!r}): the model diverged or eval failed"
    problems = []
    if changed := harness_changes(workspace, pins):
        problems.append(f"{', '.join(changed)} changed during the run; the evaluation harness is frozen: restore "
                        f"it with {restore_hint(changed)} and never write to it from {TRAIN}")
    pinned = pins.get("profile") or {}
    for key in PINNED_CONSTANTS:
        if result.get(key) != pinned.get(key):
            problems.append(f"the evaluation used {key}={result.get(key)} but the session pinned "
                            f"{key}={pinned.get(key)}")
    for key, expected in (pins.get("amounts") or {}).items():
        if result.get(key) != expected:
            problems.append(f"the evaluation scored {key}={result.get(key)} but the harness scores exactly "
                            f"{expected}: evaluate_bpb's batch size or inputs were changed")
    if pins.get("val_fingerprint") is not None and result.get("val_fingerprint") != pins["val_fingerprint"]:
        problems.append(f"the validation data changed: fingerprint {str(result.get('val_fingerprint'))[:12]}, "
                        f"pinned {pins['val_fingerprint'][:12]} (re-prepare the data or start a new session)")
    if problems:
        return None, f"val_bpb {val_bpb:.6f} rejected: " + "; ".join(problems)
    return result, None
