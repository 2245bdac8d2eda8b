"""Fault injection: every promise of the integrity, reliability and security issue, tried against the real server
through a real MCP client (in process; over stdio where the server process itself is killed), with real runs.

The train.py variants are tiny so a run costs seconds: a low-rank bigram model scored by the frozen harness's
evaluate_bpb, or plain Python that never imports torch where the fault happens before any evaluation. Every test
reports to the `tally` fixture (tests/tally.py), which checks at the end that no run record was lost.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from mcp import Client, ClientSession, stdio_client

from server import workspace as ws_module
from server.app import create_server
from server.cli import create_workspace
from server.research import Settings
from support import call, device_lock_is_free, git, ledger_runs, serve_params, server_env

BUDGET = 2.0

# A model evaluate_bpb can score, trained for zero steps: the cheapest honest run.
TINY = '''"""Stand-in train.py: a low-rank bigram model, scored by the frozen harness."""
import torch
from prepare import Tokenizer, evaluate_bpb


class Tiny(torch.nn.Module):
    def __init__(self, vocab, dim=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, x):
        return self.head(self.embed(x))


tokenizer = Tokenizer.load()
model = Tiny(tokenizer.get_vocab_size())
print("step 00000 (0.0%) | loss: 9.000000 | remaining: 1s", flush=True)
'''
EVALUATE = "val_bpb = evaluate_bpb(model, tokenizer, 8)\n"

# Plain Python: the preflight sees evaluate_bpb called, but the call never runs (and torch is never imported).
NO_EVAL = '''"""Stand-in train.py that never reaches the evaluation."""
import os
import subprocess
import sys
import time

if False:
    from prepare import evaluate_bpb
    evaluate_bpb(None, None, 1)
'''


def summary(val_bpb: str) -> str:
    return f'print("---")\nprint("val_bpb:          {val_bpb}")\nprint("num_steps:        1")\n'


def sleeper(new_session: bool) -> str:
    return (f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
            f"start_new_session={new_session})\n")


# Two sleepers, one in a session of its own, then a `ready` file in the run's folder (its working directory, the one
# place a sandboxed train.py can write). Pids inside the sandbox are its own namespace's, so the tests find a run's
# processes from outside instead, by the marker every one of them carries in its environment (run_processes_alive).
SLEEPERS = sleeper(False) + sleeper(True) + "open('ready', 'w').close()\n"


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture
def settings(workspace, prepared_cache):
    return Settings(workspace=workspace, profile="smoke", dataset="sotu", cache=prepared_cache, budget_seconds=BUDGET)


@pytest.fixture(autouse=True)
def no_process_left_behind(tmp_path):
    """No test may leave a training process (or anything it spawned) alive: they all carry a result-file path
    under this test's tmp_path in their environment. A failing test still gets its processes killed here."""
    yield
    marker = f"AUTORESEARCH_RESULT_FILE={tmp_path.resolve()}/".encode()
    survivors = []
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if alive(pid) and any(entry.startswith(marker) for entry in environ.split(b"\0")):
            os.kill(pid, signal.SIGKILL)
            survivors.append(pid)
    assert not survivors, f"processes survived the test: {survivors}"


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: state, ppid, pgrp, ...; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for a reaper that may never come in a container)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in "ZX"


def wait_for_file(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def wait_ready(workspace: Path, run_id: str) -> None:
    """Until the run's train.py has started its sleepers (SLEEPERS)."""
    wait_for_file(workspace / ".autoresearch" / "runs" / run_id / "ready")


def first_run_ready(workspace: Path) -> str:
    """The id of the workspace's first run, once its train.py has started its sleepers."""
    wait_until(lambda: (workspace / ".autoresearch" / "ledger.jsonl").exists() and ledger_runs(workspace))
    run_id = next(iter(ledger_runs(workspace)))
    wait_ready(workspace, run_id)
    return run_id


def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.05)


async def refused(client, tally, name, **arguments) -> str:
    """A bad input: the tool must refuse it (and the tally counts it)."""
    result = await client.call_tool(name, arguments)
    assert result.is_error, f"{name}({str(arguments)[:200]}) should have been refused"
    tally.bad_input()
    return result.content[0].text


async def run(client, tally, workspace, description, source=None, **arguments) -> dict:
    """write_train(source) if given, then run_experiment; the result is remembered for the records check."""
    if source is not None:
        await call(client, "write_train", content=source)
    return tally.run(workspace, await call(client, "run_experiment", description=description, **arguments))


def in_process(settings, body):
    """Run `await body(client)` with a client connected to a fresh server built from these settings."""
    async def main():
        async with Client(create_server(settings)) as client:
            await body(client)
    try:
        anyio.run(main)
    except BaseExceptionGroup as group:  # the client's task groups wrap a failed assertion: show it plainly
        raise first_leaf(group) from None


def first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


# ---------------------------------------------------------------------------------------------------------------
# evaluation integrity


def test_a_printed_val_bpb_is_never_recorded(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="fake-print")
        # the plain lie: no evaluation at all. The preflight refuses it before any budget is spent.
        lie = '"""Prints a number."""\nprint("---")\nprint("val_bpb:          0.100000")\n'
        await call(client, "write_train", content=lie)
        message = await refused(client, tally, "run_experiment", description="print a fake val_bpb")
        assert "evaluate_bpb" in message and "line" in message

        # a lie that gets past the preflight (the evaluation is dead code): the run ran, nothing was measured
        faked = await run(client, tally, workspace, "print a fake val_bpb, skip the eval",
                          NO_EVAL + summary("0.100000") + "sys.exit(0)\n")
        assert faked["status"] == "crashed" and faked["val_bpb"] is None
        assert "no model was handed over" in faked["error"] and "printed val_bpb does not count" in faked["error"]

        # an honest evaluation with a different number printed: the trusted evaluator's score wins
        honest = await run(client, tally, workspace, "real eval, fake print", TINY + EVALUATE + summary("0.100000"))
        assert honest["status"] == "succeeded"
        assert honest["val_bpb"] > 1.0
        assert "val_bpb" not in honest["metrics"]
        rows = (await call(client, "results"))["rows"]
        assert [r["val_bpb"] for r in rows] == [None, honest["val_bpb"]]
        assert "0.100000" not in (workspace / "results.tsv").read_text()
    in_process(settings, body)
    tally.fault_survived()


def test_a_crash_after_printing_a_summary_records_no_val_bpb(settings, workspace, tally):
    source = TINY + EVALUATE + summary("0.100000") + 'raise RuntimeError("crashed after the summary")\n'

    async def body(client):
        await call(client, "start_session", tag="crash-after")
        crashed = await run(client, tally, workspace, "evaluate, print, then crash", source)
        assert crashed["status"] == "crashed" and crashed["val_bpb"] is None
        assert "crashed after the summary" in crashed["error"]
        assert "RuntimeError" in crashed["log_tail"]
        assert (await call(client, "results"))["rows"][0]["status"] == "crash"
        assert "only a succeeded run" in await refused(client, tally, "keep", run_id=crashed["run_id"])
    in_process(settings, body)
    tally.fault_survived()


def test_a_model_that_sees_the_future_or_reports_its_own_loss_is_not_scored(settings, workspace, tally):
    # the two ways a model could make evaluate_bpb's number meaningless: a leak of the next token (a broken
    # causal mask), and a forward that hands back a loss of its choosing instead of logits
    peeks = TINY.replace("return self.head(self.embed(x))", "return 30.0 * (torch.roll(x, -1, 1)[..., None] == "
                         "torch.arange(self.head.out_features)).float()")
    own_loss = TINY.replace("return self.head(self.embed(x))", "return self.head.weight.sum() * 0")

    async def body(client):
        await call(client, "start_session", tag="leaks")
        leak = await run(client, tally, workspace, "attend to the future", peeks + EVALUATE)
        assert leak["status"] == "crashed" and leak["val_bpb"] is None
        assert "not causal" in leak["error"] + leak["log_tail"]
        scaled = await run(client, tally, workspace, "report a loss of my own", own_loss + EVALUATE)
        assert scaled["status"] == "crashed" and scaled["val_bpb"] is None
        assert "logits" in scaled["error"] + scaled["log_tail"]
    in_process(settings, body)
    tally.fault_survived(2)


def test_prepare_py_edited_at_run_time_fails_the_run_and_it_stays_failed(settings, workspace, tally):
    # The path is assembled at run time, out of the preflight's sight. In the sandbox the harness is read-only and
    # the write fails; without it (isolation none) the pins catch the change after the run.
    # the run's own folder is its working directory; the harness folder is the one on its import path
    source = TINY + EVALUATE + ('import os\nopen(os.environ["PYTHONPATH"] + "/prep" + "are.py", "a")'
                                '.write("\\nEVAL_TOKENS = 1\\n")\n')

    async def body(client):
        await call(client, "start_session", tag="tamper")
        tampered = await run(client, tally, workspace, "append to the harness", source)
        assert tampered["status"] == "crashed" and tampered["val_bpb"] is None
        changed = "training/prepare.py changed during the run" in tampered["error"]
        assert changed or "Read-only file system" in tampered["error"] + tampered["log_tail"], tampered["error"]
        assert "only a succeeded run" in await refused(client, tally, "keep", run_id=tampered["run_id"])
        if changed:
            assert "restore it" in tampered["error"]
            # the harness stays changed, so nothing else runs until it is restored
            message = await refused(client, tally, "run_experiment", description="try again")
            assert "training/prepare.py" in message
            git(workspace, "checkout", "--", "training/prepare.py")
        else:  # the sandbox kept the harness as it was
            assert git(workspace, "status", "--porcelain", "--", "training/prepare.py") == ""
        assert ledger_runs(workspace)[tampered["run_id"]]["status"] == "crashed"

        await call(client, "write_train", content=TINY + EVALUATE)
        again = await run(client, tally, workspace, "harness restored", None)
        assert again["status"] == "succeeded"
        assert ledger_runs(workspace)[tampered["run_id"]]["status"] == "crashed"  # stays failed
    in_process(settings, body)
    tally.fault_survived()


def test_a_result_file_written_by_train_py_is_refused_or_rejected(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="forge")
        # naming the result file is refused before any budget is spent
        for forge in ('path = os.environ["AUTORESEARCH_RESULT_FILE"]\n',
                      'open(".autoresearch/runs/r0001/result.json", "w").write("{}")\n'):
            await call(client, "write_train", content=NO_EVAL + forge)
            message = await refused(client, tally, "run_experiment", description="forge the result")
            assert f"train.py line {NO_EVAL.count(chr(10)) + 1}: mentions" in message
        assert ledger_runs(workspace) == {}

        # the same forgery with the name hidden from the preflight: result.json is never read; no model, no score
        hidden = NO_EVAL + (
            'path = os.environ["AUTORESEARCH_" + "RESULT_FILE"]\n'
            'open(path, "w").write(\'{"val_bpb": 0.1}\')\n')
        forged = await run(client, tally, workspace, "forge the result file", hidden)
        assert forged["status"] == "crashed" and forged["val_bpb"] is None
        assert "no model was handed over" in forged["error"]
    in_process(settings, body)
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# runs that cannot wedge the machine


def test_a_child_process_that_outlives_train_py_is_killed(settings, workspace, tally):
    source = TINY.replace('"""\n', '"""\nimport os, subprocess, sys\n', 1) + EVALUATE + SLEEPERS

    async def body(client):
        await call(client, "start_session", tag="children")
        result = await run(client, tally, workspace, "leave two sleepers behind", source)
        assert result["status"] == "succeeded"
        assert (workspace / ".autoresearch" / "runs" / result["run_id"] / "ready").exists()
        assert run_processes_alive(workspace) == []
    in_process(settings, body)
    tally.fault_survived()


def test_an_infinite_loop_is_killed_at_the_hard_timeout(workspace, prepared_cache, tally):
    source = NO_EVAL + SLEEPERS + "while True:\n    pass\n"
    settings = Settings(workspace=workspace, profile="smoke", dataset="sotu", cache=prepared_cache,
                        budget_seconds=BUDGET, timeout_seconds=3)

    async def body(client):
        await call(client, "start_session", tag="loop")
        result = await run(client, tally, workspace, "never stops", source)
        assert result["status"] == "timed_out" and result["val_bpb"] is None
        assert "hard timeout" in result["error"]
        assert (workspace / ".autoresearch" / "runs" / result["run_id"] / "ready").exists()
        assert run_processes_alive(workspace) == []  # train.py, its sleepers, everything the run started
        assert (await call(client, "status"))["run_in_progress"] is None
    in_process(settings, body)
    tally.fault_survived()


def test_nan_loss_is_a_crash_with_the_failing_line(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="nan")
        source = (workspace / "training" / "train.py").read_text()
        line = next(l for l in source.splitlines() if l.startswith("EMBEDDING_LR"))
        await call(client, "edit_train", old_text=line, new_text='EMBEDDING_LR = float("nan")')
        result = tally.run(workspace, await call(client, "run_experiment", description="NaN learning rate"))
        assert result["status"] == "crashed" and result["val_bpb"] is None
        assert "FAIL: loss is NaN" in result["error"]
        assert "FAIL: loss is NaN" in result["log_tail"]
    in_process(settings, body)
    tally.fault_survived()


def test_a_syntax_error_is_refused_before_any_budget_is_spent(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="syntax")
        head = git(workspace, "rev-parse", "HEAD")
        source = (workspace / "training" / "train.py").read_text().splitlines()
        broken = "\n".join(source[:29] + ["def oops(:"] + source[29:]) + "\n"
        await call(client, "write_train", content=broken)
        message = await refused(client, tally, "run_experiment", description="broken")
        assert "train.py line 30: SyntaxError" in message
        assert git(workspace, "rev-parse", "HEAD") == head  # nothing committed
        status = await call(client, "status")
        assert status["runs"] == 0 and status["run_in_progress"] is None and status["train_py_modified"]
        assert not (workspace / ".autoresearch" / "runs").exists()  # nothing was started
    in_process(settings, body)
    tally.fault_survived()


def test_an_import_error_is_a_crash_naming_the_module(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="import")
        result = await run(client, tally, workspace, "missing module",
                           NO_EVAL + "import flash_attention_that_is_not_installed\n")
        assert result["status"] == "crashed"
        assert "ModuleNotFoundError" in result["error"]
        assert "flash_attention_that_is_not_installed" in result["log_tail"]
    in_process(settings, body)
    tally.fault_survived()


def forever() -> str:
    """A run that trains forever: it starts two sleepers, prints progress, and never ends."""
    return NO_EVAL + SLEEPERS + (
        "step = 0\nwhile True:\n"
        "    print(f'step {step:05d} (1.0%) | loss: 4.000000 | remaining: 1s', flush=True)\n"
        "    step += 1\n    time.sleep(0.2)\n")


def test_cancel_run_stops_a_run_mid_flight(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="cancel")
        started = await run(client, tally, workspace, "forever", forever(), max_wait_seconds=0.1)
        assert started["status"] == "running"
        wait_ready(workspace, started["run_id"])
        # no decision on a run still training: discard is refused (cancel it first), keep too; nothing recorded
        said = await refused(client, tally, "discard", run_id=started["run_id"])
        assert "still training" in said and f"cancel_run({started['run_id']!r})" in said
        assert "only a succeeded run can be kept" in await refused(client, tally, "keep", run_id=started["run_id"])
        assert ledger_runs(workspace)[started["run_id"]].get("decision") is None
        cancelled = tally.run(workspace, await call(client, "cancel_run", run_id=started["run_id"]))
        assert cancelled["status"] == "cancelled" and cancelled["val_bpb"] is None
        assert run_processes_alive(workspace) == []
        assert (await call(client, "status"))["run_in_progress"] is None
    in_process(settings, body)
    tally.fault_survived()


def test_a_client_that_cancels_its_waiting_call_stops_the_run(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="client-cancel")
        await call(client, "write_train", content=forever())
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(client.call_tool, "run_experiment", {"description": "the client gives up"})
            run_id = await anyio.to_thread.run_sync(first_run_ready, workspace)
            tasks.cancel_scope.cancel()  # the client sends notifications/cancelled for the pending call
        with anyio.fail_after(30):
            while ledger_runs(workspace)[run_id]["status"] == "running":
                await anyio.sleep(0.05)
        record = ledger_runs(workspace)[run_id]
        assert record["status"] == "cancelled"
        tally.run(workspace, {"run_id": run_id, "status": "cancelled", "val_bpb": None})
        assert run_processes_alive(workspace) == []
        assert (await call(client, "status"))["run_in_progress"] is None
    in_process(settings, body)
    tally.fault_survived()


def test_a_client_that_disconnects_mid_run_leaves_nothing_running(settings, workspace, tally):
    started = {}

    async def body(client):
        await call(client, "start_session", tag="disconnect")
        started.update(await run(client, tally, workspace, "forever", forever(), max_wait_seconds=0.1))
        wait_ready(workspace, started["run_id"])
    in_process(settings, body)  # the client goes away; the server's session ends with the run still training
    assert run_processes_alive(workspace) == []
    record = ledger_runs(workspace)[started["run_id"]]
    assert record["status"] == "interrupted" and "shut down" in record["error"]
    tally.fault_survived()


def test_a_server_killed_mid_run_is_cleaned_up_by_the_next_one(settings, workspace, prepared_cache, tally, tmp_path):
    params = serve_params(workspace, prepared_cache, BUDGET, env=server_env(tmp_path))
    started = {}

    async def first_server():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            await call(session, "start_session", tag="sigkill")
            started.update(await run(session, tally, workspace, "forever", forever(), max_wait_seconds=0.1))
            wait_ready(workspace, started["run_id"])
            server_pid = ledger_runs(workspace)[started["run_id"]]["server_pid"]
            os.kill(server_pid, signal.SIGKILL)
            with anyio.fail_after(30):
                while alive(server_pid):
                    await anyio.sleep(0.05)

    try:
        anyio.run(first_server)
    except BaseException as e:  # the transport tears down noisily after the kill; a failed check still fails
        if isinstance(first_leaf(e), (AssertionError, KeyboardInterrupt, pytest.fail.Exception)):
            raise first_leaf(e) from None
    assert started["status"] == "running"
    # the run's launcher saw its server die and took the run down: no orphan trains on, none holds the device
    wait_until(lambda: not run_processes_alive(workspace) and device_lock_is_free())
    assert ledger_runs(workspace)[started["run_id"]]["status"] == "running"  # until the next server settles it

    async def second_server(client):
        record = ledger_runs(workspace)[started["run_id"]]
        assert record["status"] == "interrupted"  # recorded at start-up, before any tool call
        assert "the server stopped while this run was training" in record["error"]
        status = await call(client, "status")
        assert status["run_in_progress"] is None
        # the run was a candidate: the branch stayed at the kept commit; its code is the scratch copy and its ref
        assert status["head"] == status["kept_commit"] == git(workspace, "rev-parse", "HEAD") == started["parent"]
        assert git(workspace, "status", "--porcelain") == "M training/train.py"
        assert git(workspace, "rev-parse", f"refs/autoresearch/runs/{started['run_id']}") == started["commit"]
        rows = (await call(client, "results"))["rows"]
        assert [(r["run_id"], r["status"]) for r in rows] == [(started["run_id"], "crash")]
        # the device lock is free: a new run starts
        again = await run(client, tally, workspace, "after the crash", None, max_wait_seconds=0.1)
        assert again["status"] == "running"
        wait_ready(workspace, again["run_id"])
        tally.run(workspace, await call(client, "cancel_run", run_id=again["run_id"]))

    in_process(settings, second_server)
    tally.fault_survived()


def test_two_servers_contending_for_one_device(tmp_path, prepared_cache, tally):
    first_ws, second_ws = tmp_path / "first", tmp_path / "second"
    create_workspace(first_ws)
    create_workspace(second_ws)
    first = create_server(Settings(workspace=first_ws, profile="smoke", dataset="sotu", cache=prepared_cache,
                                   budget_seconds=BUDGET))
    second = create_server(Settings(workspace=second_ws, profile="smoke", dataset="sotu", cache=prepared_cache,
                                    budget_seconds=BUDGET))

    async def main():
        async with Client(first) as a, Client(second) as b:
            await call(a, "start_session", tag="one")
            await call(b, "start_session", tag="two")
            holder = await run(a, tally, first_ws, "holds the device", forever(), max_wait_seconds=0.1)
            wait_ready(first_ws, holder["run_id"])
            await call(b, "write_train", content=NO_EVAL + "sys.exit(0)\n")
            message = await refused(b, tally, "run_experiment", description="wants the device")
            assert "busy" in message and holder["run_id"] in message and str(first_ws) in message
            assert str(ledger_runs(first_ws)[holder["run_id"]]["pid"]) in message  # its launcher, which holds the lock
            assert ledger_runs(second_ws) == {}
            tally.run(first_ws, await call(a, "cancel_run", run_id=holder["run_id"]))
            after = await run(b, tally, second_ws, "the device is free again")
            assert after["status"] == "crashed" and "no model was handed over" in after["error"]  # it ran
    anyio.run(main)
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# nothing lost


def test_a_torn_ledger_line_loses_nothing(settings, workspace, tally, caplog):
    async def body(client):
        await call(client, "start_session", tag="torn")
        first = await run(client, tally, workspace, "first", NO_EVAL + "sys.exit(0)\n")
        ledger = workspace / ".autoresearch" / "ledger.jsonl"
        with open(ledger, "ab") as f:  # a power cut in the middle of a write
            f.write(b'{"type": "run", "id": "r0002", "status": "succ')
        with caplog.at_level(logging.WARNING):
            status = await call(client, "status")
            rows = (await call(client, "results"))["rows"]
        assert status["session"] == "torn" and status["runs"] == 1
        assert [r["run_id"] for r in rows] == [first["run_id"]]
        assert "damaged" in caplog.text
        assert status["ledger_damaged_lines"] == [len(ledger.read_bytes().splitlines())]  # reported to the agent
        second = await run(client, tally, workspace, "second", None)
        assert second["run_id"] == "r0002"
        rows = (await call(client, "results"))["rows"]
        assert [r["run_id"] for r in rows] == [first["run_id"], second["run_id"]]
        assert len((workspace / "results.tsv").read_text().splitlines()) == 3
        lines = ledger.read_bytes().splitlines()
        torn = lines.index(b'{"type": "run", "id": "r0002", "status": "succ')  # left as it was, not rewritten
        assert all(isinstance(json.loads(line), dict) for line in lines[:torn] + lines[torn + 1:])
    in_process(settings, body)
    tally.fault_survived()


# ---------------------------------------------------------------------------------------------------------------
# input and access


def test_path_escapes_are_refused(settings, workspace, tally, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("top secret")
    (workspace / "training" / "escape.py").symlink_to(outside)
    readme = workspace / "README.md"  # an in-scope name that is a symlink leaving the workspace
    readme.symlink_to(outside)

    async def body(client):
        for path in ("../secret.txt", "training/../../secret.txt", str(outside), "/etc/passwd", "training/escape.py",
                     "README.md", ".git/config", ".autoresearch/ledger.jsonl", "training/train.py\0",
                     "training//../program.md", "~/.ssh/id_rsa"):
            message = await refused(client, tally, "read_file", path=path)
            assert "top secret" not in message
        assert (await call(client, "read_file", path="./training//train.py"))["path"] == "training/train.py"
    in_process(settings, body)
    tally.fault_survived()


def test_oversized_inputs_are_refused_and_change_nothing(settings, workspace, tally):
    train = workspace / "training" / "train.py"
    original = train.read_text()

    async def body(client):
        await call(client, "start_session", tag="sizes")
        big = "x" * 1_000_001
        wide = "é" * 600_000  # under a million characters, over a million bytes
        await refused(client, tally, "write_train", content=big)
        await refused(client, tally, "write_train", content=wide)
        await refused(client, tally, "edit_train", old_text=big, new_text="y")
        await refused(client, tally, "edit_train", old_text="import os", new_text=big)
        await refused(client, tally, "edit_train", old_text="import os", new_text=wide)
        message = await refused(client, tally, "edit_train", old_text="import os", new_text="#" * 999_999)
        assert "the edited file" in message and "limit" in message
        await refused(client, tally, "edit_train", old_text="\ud800", new_text="y")
        assert train.read_text() == original
        await refused(client, tally, "run_experiment", description="d" * 2001)
        await refused(client, tally, "run_experiment", description="   ")
        await refused(client, tally, "read_file", limit=1_000_000)
        await refused(client, tally, "read_log", run_id="r" * 100_000)
        assert train.read_text() == original and ledger_runs(workspace) == {}
        assert git(workspace, "status", "--porcelain") == ""
    in_process(settings, body)
    tally.fault_survived()


def test_no_edit_through_the_tool_corrupts_train_py(settings, workspace):
    """Property: whatever edit_train is sent, train.py afterwards is exactly the one replacement or unchanged."""
    train = workspace / "training" / "train.py"
    original = train.read_text()
    any_text = st.text(st.characters(blacklist_categories=()), max_size=40)  # surrogates, NULs, newlines...

    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(Client(create_server(settings))) as client:
            portal.call(client.call_tool, "start_session", {"tag": "property"})

            @given(data=st.data(), new=any_text)
            @hypothesis_settings(max_examples=60, deadline=None, derandomize=True)
            def edit(data, new):
                train.write_text(original)  # every example starts from the same file
                before = original
                start = data.draw(st.integers(0, len(before)))
                old = data.draw(st.one_of(st.just(before[start:start + data.draw(st.integers(0, 80))]), any_text))
                result = portal.call(client.call_tool, "edit_train", {"old_text": old, "new_text": new})
                after = train.read_text()
                if result.is_error:
                    assert after == before
                else:
                    assert old and before.count(old) == 1 and after == before.replace(old, new, 1)

            edit()


def test_option_like_tags_and_descriptions_never_reach_git_as_options(settings, workspace, tally):
    async def body(client):
        branches = git(workspace, "branch", "--list")
        for tag in ("--force", "-D", "--upload-pack=touch /tmp/pwned", "a..b", "x.lock", "../main", "refs/heads/x",
                    "tag with space", "", "t" * 65):
            message = await refused(client, tally, "start_session", tag=tag)
            assert "invalid session tag" in message or "at most 64" in message
        assert git(workspace, "branch", "--list") == branches
        await call(client, "start_session", tag="options")
        for description in ("--amend", "-m evil --no-verify"):
            result = await run(client, tally, workspace, description,
                               NO_EVAL + f"sys.exit(0)  # {description}\n")
            tally.bad_input()
            assert git(workspace, "log", "-1", "--format=%s", result["commit"]) == description
            assert git(workspace, "rev-parse", f"refs/autoresearch/runs/{result['run_id']}") == result["commit"]
            assert git(workspace, "rev-list", "--count", result["commit"]) == "2"  # a child of the kept commit
        assert git(workspace, "rev-list", "--count", "HEAD") == "1"  # nothing amended, the branch never moved
        await refused(client, tally, "read_log", run_id="--all")
        await refused(client, tally, "read_log", run_id="../../.git/config")
        await refused(client, tally, "discard", run_id="-f")
    in_process(settings, body)
    tally.fault_survived()


def test_the_records_check_catches_a_lost_or_altered_record(tmp_path):
    """The tally's 'records lost' is computed from the ledger, so it can be non-zero."""
    from tally import Tally, Totals
    from server.ledger import Ledger

    Ledger(tmp_path).append({"type": "run", "id": "r0001", "status": "crashed", "val_bpb": None})
    Ledger(tmp_path).append({"type": "run", "id": "r0002", "status": "running", "val_bpb": None})
    check = Tally(Totals())
    check.run(tmp_path, {"run_id": "r0001", "status": "crashed", "val_bpb": None})
    assert check.lost_records() == []
    check.run(tmp_path, {"run_id": "r0001", "status": "succeeded", "val_bpb": 0.9})
    check.run(tmp_path, {"run_id": "r0002", "status": "running", "val_bpb": None})
    check.run(tmp_path, {"run_id": "r0003", "status": "cancelled", "val_bpb": None})
    assert [lost.split(":")[0] for lost in check.lost_records()] == ["r0001", "r0002", "r0003"]


# ---------------------------------------------------------------------------------------------------------------
# one lock for the workspace, runs from their commit, crash-safe starts


def test_keep_and_discard_of_one_run_at_once_exactly_one_wins(settings, workspace, tally):
    async def body(client):
        await call(client, "start_session", tag="decide-race")
        baseline = await run(client, tally, workspace, "baseline", TINY + EVALUATE)
        await call(client, "keep", run_id=baseline["run_id"])
        kept = baseline["commit"]
        for attempt in range(2):
            result = await run(client, tally, workspace, f"idea {attempt}", TINY + EVALUATE + f"# idea {attempt}\n")
            assert result["status"] == "succeeded"
            answers = {}

            async def decide(name):
                answers[name] = await client.call_tool(name, {"run_id": result["run_id"]})

            async with anyio.create_task_group() as tasks:  # both calls in flight at once, in worker threads
                tasks.start_soon(decide, "keep")
                tasks.start_soon(decide, "discard")
            winners = [name for name, answer in answers.items() if not answer.is_error]
            assert len(winners) == 1, {name: a.content[0].text for name, a in answers.items()}
            [loser] = set(answers) - set(winners)
            assert "already decided" in answers[loser].content[0].text
            tally.bad_input()
            # the ledger and the branch tell the same story
            assert ledger_runs(workspace)[result["run_id"]]["decision"] == winners[0]
            kept = result["commit"] if winners[0] == "keep" else kept
            assert git(workspace, "rev-parse", "HEAD") == kept
            assert git(workspace, "status", "--porcelain") == ""
            assert (await call(client, "status"))["kept_commit"] == kept
    in_process(settings, body)
    tally.fault_survived()


def test_a_second_server_on_one_workspace_refuses_to_start(settings, workspace, prepared_cache, tally, tmp_path):
    async def body(client):
        await call(client, "start_session", tag="one-server")
        # the command line: one line saying what is wrong, no traceback, a non-zero exit
        proc = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--workspace", str(workspace), "--profile", "smoke",
             "--dataset", "sotu", "--cache", str(prepared_cache)],
            env=server_env(tmp_path), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL))
        output = (proc.stdout + proc.stderr).strip()
        assert proc.returncode != 0 and "already serving" in output, output
        assert "Traceback" not in output and len(output.splitlines()) <= 3
        # in the same process, a second server's session cannot start either
        with pytest.raises(BaseException) as refused_start:
            with anyio.fail_after(60):
                async with Client(create_server(settings)) as other:
                    await other.call_tool("status", {})
        assert "already serving" in repr(first_leaf(refused_start.value)) + str(first_leaf(refused_start.value))
        tally.bad_input(2)
        # the first server goes on, and what it runs is what it records
        result = await run(client, tally, workspace, "still the only server", TINY + EVALUATE)
        assert result["status"] == "succeeded"
        assert git(workspace, "rev-parse", f"refs/autoresearch/runs/{result['run_id']}") == result["commit"]
    in_process(settings, body)
    tally.fault_survived()


def test_an_edit_during_a_run_does_not_change_what_runs(settings, workspace, tally):
    # it waits for a `go` file in its own folder (the one place a sandboxed train.py sees the test write)
    waits = TINY + "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.05)\n" + EVALUATE

    async def body(client):
        await call(client, "start_session", tag="edit-mid-run")
        started = await run(client, tally, workspace, "waits, then evaluates", waits, max_wait_seconds=0.1)
        assert started["status"] == "running"
        # the agent rewrites train.py behind the server's back (its own shell), and through the tool
        (workspace / "training" / "train.py").write_text(NO_EVAL + 'raise SystemExit("the edited code ran")\n')
        await call(client, "write_train", content=NO_EVAL + 'raise SystemExit("the edited scratch copy ran")\n')
        (workspace / ".autoresearch" / "runs" / started["run_id"] / "go").touch()
        done = tally.run(workspace, await call(client, "wait_for_run", run_id=started["run_id"]))
        assert done["status"] == "succeeded" and done["val_bpb"] > 1.0
        copy = workspace / ".autoresearch" / "runs" / started["run_id"] / "train.py"
        assert copy.read_text() == waits == subprocess.run(
            ["git", "-C", str(workspace), "show", f"{started['commit']}:training/train.py"],
            capture_output=True, text=True, check=True).stdout
    in_process(settings, body)
    tally.fault_survived()


def test_a_symlinked_train_py_leaks_nothing(settings, workspace, tally, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("PASSWORD = 'hunter2'\n")

    async def body(client):
        await call(client, "start_session", tag="symlinked")
        train = workspace / "training" / "train.py"
        train.unlink()
        train.symlink_to(secret)
        for name, arguments in [("read_file", {"path": "training/train.py"}),
                                ("edit_train", {"old_text": "PASSWORD = 'hunter3'", "new_text": "x = 1"}),
                                ("write_train", {"content": "x = 1\n"}),
                                ("diff_train", {}),
                                ("run_experiment", {"description": "train the symlink"})]:
            message = await refused(client, tally, name, **arguments)
            assert "hunter2" not in message and "symlink" in message, (name, message)
        with pytest.raises(BaseException) as resource:
            answer = await client.read_resource("autoresearch://train.py")
            assert "hunter2" not in str(answer)  # an error answer would do too, as long as nothing leaks
            raise AssertionError("the resource was served")
        assert "hunter2" not in str(resource.value)
        assert "hunter2" not in json.dumps(await call(client, "status"))
        assert secret.read_text() == "PASSWORD = 'hunter2'\n" and train.is_symlink()
        assert ledger_runs(workspace) == {}
    in_process(settings, body)
    tally.fault_survived()


def test_the_near_miss_search_is_bounded_through_the_server(settings, workspace, tally, monkeypatch):
    compared = []
    ratio = ws_module.difflib.SequenceMatcher.ratio

    def counting_ratio(self):
        compared.append(max(len(self.a), len(self.b)))
        return ratio(self)
    monkeypatch.setattr(ws_module.difflib.SequenceMatcher, "ratio", counting_ratio)
    one_line = "x = [" + ", ".join(map(str, range(30_000))) + "]\n"  # ~190 KB on one line
    many_lines = "value = compute(x, y)\n" * 20_000

    async def body(client):
        await call(client, "start_session", tag="near-miss")
        for text, old in ((one_line, one_line[:-3] + "0]"), (many_lines, "value = compute(x, z)")):
            await call(client, "write_train", content=text)
            compared.clear()
            message = await refused(client, tally, "edit_train", old_text=old, new_text="x = 0")
            assert "not found" in message
            # every quadratic comparison is of bounded size, and there is at most one per line
            assert compared and max(compared) <= ws_module.NEAR_MISS_CHARS
            assert len(compared) <= text.count("\n")
            assert (await call(client, "status"))["session"] == "near-miss"
    in_process(settings, body)
    tally.fault_survived()


def server_processes(workspace: Path) -> list:
    """The `serve --workspace <workspace>` processes this test started (the stdio client spawns them)."""
    import psutil
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "serve" in proc.cmdline() and str(workspace) in proc.cmdline():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def run_processes_alive(workspace: Path) -> list[int]:
    """Processes carrying a result-file path of this workspace's runs: the launchers, train.py, their children."""
    import psutil
    marker = str(workspace / ".autoresearch" / "runs")
    alive_pids = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("AUTORESEARCH_RESULT_FILE", "").startswith(marker) and alive(proc.pid):
                alive_pids.append(proc.pid)
        except psutil.Error:
            continue
    return alive_pids


KILL_DELAYS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.5)  # seconds after run_experiment is sent


def test_kill_9_at_any_instant_of_a_start_leaves_ledger_git_and_device_lock_in_agreement(
        settings, workspace, prepared_cache, tally, tmp_path):
    params = serve_params(workspace, prepared_cache, BUDGET, env=server_env(tmp_path))

    for attempt, delay in enumerate(KILL_DELAYS):
        async def one_try():
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                await call(session, "start_session", tag="kill9", resume=attempt > 0)
                await call(session, "write_train", content=NO_EVAL + f"time.sleep(600)  # attempt {attempt}\n")
                [server] = server_processes(workspace)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(session.call_tool, "run_experiment",
                                     {"description": f"killed {delay}s in", "max_wait_seconds": 0})
                    await anyio.sleep(delay)
                    server.kill()  # SIGKILL
                    server.wait(30)

        try:
            anyio.run(one_try)
        except BaseException as e:  # the transport tears down noisily after the kill; a failed check still fails
            if isinstance(first_leaf(e), (AssertionError, KeyboardInterrupt, pytest.fail.Exception)):
                raise first_leaf(e) from None
        # without any server: whatever was launched is taken down by its launcher, and the device is free
        wait_until(lambda: not run_processes_alive(workspace) and device_lock_is_free())
        tally.fault_survived()

    async def next_server(client):
        status = await call(client, "status")
        assert status["run_in_progress"] is None
        runs = ledger_runs(workspace)
        assert all(r["status"] not in ("starting", "running") for r in runs.values()), runs
        for run_id, record in runs.items():
            assert record["status"] == "interrupted" and "the server stopped" in record["error"]
            # every recorded run's code is in git, under its run ref
            assert git(workspace, "rev-parse", f"refs/autoresearch/runs/{run_id}") == record["commit"]
            tally.run(workspace, {"run_id": run_id, "status": "interrupted", "val_bpb": None})
        assert not (workspace / ".git" / "index.lock").exists()
        assert git(workspace, "status", "--porcelain") in ("", "M training/train.py")
        # and the loop goes on: a new run starts on the free device and ends
        after = await run(client, tally, workspace, "after the kills", NO_EVAL + "sys.exit(0)\n")
        assert after["status"] == "crashed" and "no model was handed over" in after["error"]

    in_process(settings, next_server)
