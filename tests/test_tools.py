"""Every tool, through a real MCP client connected in process, against a real workspace and real training runs."""

import json

import anyio
import pytest
from mcp import Client

from server import sandbox
from server.app import create_server
from server.research import Settings
from support import call, git

TOOLS = {
    "status", "start_session", "read_file", "edit_train", "write_train", "diff_train", "run_experiment",
    "wait_for_run", "cancel_run", "keep", "discard", "rebase_run", "results", "read_log", "plot_progress",
    "measure_noise",
}
READ_ONLY = {"status", "read_file", "diff_train", "results", "read_log", "plot_progress", "wait_for_run"}
BUDGET = 2.0


@pytest.fixture
def server(workspace, prepared_cache):
    return create_server(Settings(workspace=workspace, profile="smoke", dataset="sotu", cache=prepared_cache,
                                  budget_seconds=BUDGET))


async def refused(client, name, **arguments) -> str:
    result = await client.call_tool(name, arguments)
    assert result.is_error, f"{name} should have been refused"
    return result.content[0].text


def run_async(fn):
    """Run an async test body with a client connected to the server fixture."""
    def wrapper(server, workspace):
        async def main():
            async with Client(server) as client:
                await fn(client, workspace)
        anyio.run(main)
    wrapper.__name__ = fn.__name__
    return wrapper


def test_tool_list_names_annotations_and_instructions(server):
    async def main():
        async with Client(server) as client:
            assert "run_experiment" in client.instructions and "keep" in client.instructions
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == TOOLS
            for name, tool in tools.items():
                assert tool.description, name
                assert tool.annotations.read_only_hint is (name in READ_ONLY), name
            assert tools["discard"].annotations.destructive_hint is True
            assert tools["edit_train"].input_schema["properties"]["old_text"]["description"]
            assert tools["status"].output_schema["properties"]["kept_commit"]["description"]
    anyio.run(main)


@run_async
async def test_status_before_any_session(client, workspace):
    status = await call(client, "status")
    assert status["session"] is None
    assert status["branch"] == "main"
    assert status["data_ready"] is True
    assert status["profile"]["name"] == "smoke"
    assert status["budget_seconds"] == BUDGET
    assert status["train_py_modified"] is False
    # the isolation in force for the next run, and why: the sandbox wherever it works (serve --isolation auto)
    assert status["isolation"] == ("sandbox" if sandbox.probe()[0] else "none") and status["isolation_reason"]
    assert "start_session" in await refused(client, "results")


@run_async
async def test_start_session_creates_branch_and_refuses_duplicates(client, workspace):
    session = await call(client, "start_session", tag="nov29")
    assert session["branch"] == "autoresearch/nov29"
    assert git(workspace, "branch", "--show-current") == "autoresearch/nov29"
    assert "baseline" in session["next_step"]
    assert "resume" in await refused(client, "start_session", tag="nov29")
    resumed = await call(client, "start_session", tag="nov29", resume=True)
    assert resumed["resumed"] is True
    for bad in ("--force", "a b", "../x", "", "x" * 65):
        await refused(client, "start_session", tag=bad)
    assert git(workspace, "branch", "--list", "autoresearch/*").count("autoresearch/") == 1


@run_async
async def test_read_file_serves_only_in_scope_files(client, workspace):
    text = await call(client, "read_file")
    assert text["path"] == "training/train.py"
    first = text["text"].splitlines()
    assert any(line.lstrip().startswith("1\t") for line in first)
    window = await call(client, "read_file", path="training/prepare.py", offset=3, limit=2)
    assert window["total_lines"] > 10
    assert len([line for line in window["text"].splitlines() if "\t" in line]) == 2
    (workspace / "secret.txt").write_text("secret")
    (workspace / "training" / "link.py").symlink_to("/etc/passwd")
    for path in ("../ws/secret.txt", "/etc/passwd", "secret.txt", "pyproject.toml", "training/link.py",
                 "training/../secret.txt"):
        message = await refused(client, "read_file", path=path)
        assert "training/train.py" in message, message  # the refusal names what is allowed


@run_async
async def test_edit_train_is_exact_and_unique(client, workspace):
    await call(client, "start_session", tag="edits")
    source = (workspace / "training" / "train.py").read_text()
    line = next(l for l in source.splitlines() if l.startswith("import "))
    edit = await call(client, "edit_train", old_text=line, new_text=line + "  # edited")
    assert "+" + line + "  # edited" in edit["diff"]
    assert (workspace / "training" / "train.py").read_text() == source.replace(line, line + "  # edited", 1)
    missing = await refused(client, "edit_train", old_text="this text is nowhere", new_text="x")
    assert "not found" in missing.lower()
    ambiguous = await refused(client, "edit_train", old_text="\n", new_text="\n\n")
    assert "line" in ambiguous.lower()
    diff = await call(client, "diff_train")
    assert "# edited" in diff["diff"]
    status = await call(client, "status")
    assert status["train_py_modified"] is True


@run_async
async def test_full_loop_baseline_keep_edit_run_discard(client, workspace):
    await call(client, "start_session", tag="loop")
    base_commit = git(workspace, "rev-parse", "HEAD")
    progress = []

    async def on_progress(done, total, message):
        progress.append((done, total, message))

    result = await client.call_tool("run_experiment", {"description": "baseline"}, progress_callback=on_progress)
    baseline = result.structured_content
    assert baseline["status"] == "succeeded", baseline
    assert 0 < baseline["val_bpb"] < 10
    assert baseline["metrics"]["num_steps"] > 0
    assert baseline["commit"] == base_commit  # nothing changed: the baseline trains HEAD
    assert progress and progress[-1][1] == 100.0
    # every notification leads with the run's phase; the last says done, at 100%
    phases = {"starting", "compiling", "warm-up", "training", "exporting", "evaluating", "done"}
    assert all(message.split()[0] in phases for _, _, message in progress), progress
    assert progress[-1][0] == 100.0 and progress[-1][2].startswith("done")
    # an undecided run blocks nothing: it is listed until someone decides it
    status = await call(client, "status")
    assert status["undecided"] == [baseline["run_id"]] == [status["awaiting_decision"]]

    kept = await call(client, "keep", run_id=baseline["run_id"])
    assert kept["kept_commit"] == base_commit

    source = (workspace / "training" / "train.py").read_text()
    await call(client, "write_train", content=source + "\n# a harmless experiment\n")
    second = await call(client, "run_experiment", description="append a comment")
    assert second["status"] == "succeeded"
    assert second["commit"] != base_commit and second["parent"] == base_commit
    assert git(workspace, "log", "-1", "--format=%s", second["commit"]) == "append a comment"
    assert git(workspace, "rev-parse", "HEAD") == base_commit  # a candidate: the branch moves only on keep
    assert second["best_val_bpb"] == baseline["val_bpb"]
    assert second["delta_vs_best"] == pytest.approx(second["val_bpb"] - baseline["val_bpb"])

    discarded = await call(client, "discard", run_id=second["run_id"])
    assert discarded["head"] == base_commit and discarded["train_py_restored"]
    assert git(workspace, "rev-parse", "HEAD") == base_commit
    assert (workspace / "training" / "train.py").read_text() == source
    assert git(workspace, "rev-parse", f"refs/autoresearch/runs/{second['run_id']}") == second["commit"]

    results = await call(client, "results")
    assert [r["status"] for r in results["rows"]] == ["keep", "discard"]
    assert results["best"]["run_id"] == baseline["run_id"]
    tsv = (workspace / "results.tsv").read_text().splitlines()
    assert tsv[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    assert [row.split("\t")[3] for row in tsv[1:]] == ["keep", "discard"]
    assert "results.tsv" not in git(workspace, "status", "--porcelain")  # untracked and ignored

    log = await call(client, "read_log", run_id=baseline["run_id"], tail=20)
    assert "eval:" in log["text"]  # the trusted evaluator scored it (its progress lines end the log)
    picture = await client.call_tool("plot_progress", {})
    assert picture.content[0].type == "image" and picture.content[0].mime_type == "image/png"

    ledger = [json.loads(l) for l in (workspace / ".autoresearch" / "ledger.jsonl").read_text().splitlines()]
    assert {r["id"] for r in ledger if r.get("type") == "run"} == {baseline["run_id"], second["run_id"]}

    resources = await client.read_resource("autoresearch://results.tsv")
    assert "discard" in resources.contents[0].text
    run_log = await client.read_resource(f"autoresearch://runs/{baseline['run_id']}/log")
    assert "eval:" in run_log.contents[0].text
    prompt = await client.get_prompt("autoresearch")
    assert "start_session" in prompt.messages[0].content.text


@run_async
async def test_max_wait_returns_running_then_wait_for_run_finishes(client, workspace):
    await call(client, "start_session", tag="wait")
    started = await call(client, "run_experiment", description="baseline", max_wait_seconds=0.2)
    assert started["status"] == "running"
    assert "wait_for_run" in started["next_step"]
    status = await call(client, "status")
    assert status["run_in_progress"]["run_id"] == started["run_id"]
    assert [r["run_id"] for r in status["runs_in_flight"]] == [started["run_id"]]
    assert status["runs_in_flight"][0]["device"]  # the device it trains on
    assert status["run_in_progress"]["progress"]["phase"] in (
        "starting", "compiling", "warm-up", "training", "exporting", "evaluating")
    assert "still training" in (await refused(client, "run_experiment", description="second")).lower()
    finished = await call(client, "wait_for_run", run_id=started["run_id"])
    assert finished["status"] == "succeeded"
    assert finished["val_bpb"] > 0


@run_async
async def test_cancel_run_stops_training(client, workspace):
    await call(client, "start_session", tag="cancel")
    started = await call(client, "run_experiment", description="baseline", max_wait_seconds=0.2)
    cancelled = await call(client, "cancel_run", run_id=started["run_id"])
    assert cancelled["status"] == "cancelled"
    assert cancelled["val_bpb"] is None
    assert (await call(client, "status"))["run_in_progress"] is None
    assert "not running" in (await refused(client, "cancel_run", run_id=started["run_id"]))


@run_async
async def test_crashed_run_needs_no_decision(client, workspace):
    await call(client, "start_session", tag="crash")
    source = (workspace / "training" / "train.py").read_text()
    await call(client, "write_train", content=source + "\nraise RuntimeError('deliberate failure')\n")
    crashed = await call(client, "run_experiment", description="crash on purpose")
    assert crashed["status"] == "crashed"
    assert crashed["val_bpb"] is None
    assert "deliberate failure" in crashed["error"] + crashed["log_tail"]
    await call(client, "write_train", content=source)
    fixed = await call(client, "run_experiment", description="fixed")
    assert fixed["status"] == "succeeded"
    rows = (await call(client, "results"))["rows"]
    assert [r["status"] for r in rows] == ["crash", "pending"]


def test_too_many_epochs_per_budget_is_a_warning_in_start_session_and_status(server):
    server.research.harness["epochs_per_budget"] = 9.4  # as prepare.py --describe would say for a small dataset

    async def main():
        async with Client(server) as client:
            session = await call(client, "start_session", tag="epochs")
            [warning] = session["warnings"]
            assert "about 9 times" in warning and "larger dataset" in warning
            assert (await call(client, "status"))["warnings"] == [warning]
    anyio.run(main)
