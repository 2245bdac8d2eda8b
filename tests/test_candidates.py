"""Candidates, not a moving branch (issue 10).

A run trains a candidate: a commit of train.py whose parent is the kept commit. Making it moves nothing: not the
branch, not the index, not the working-tree train.py (the agent's scratch copy). Only keep moves the branch, by
fast-forward, and only while the candidate's parent is still the kept commit; after another keep it refuses and
points to rebase_run, which re-applies the change onto the kept version (three-way) in the working tree. discard
records the decision; train.py goes back to the kept version only if it still holds the discarded code. An
undecided candidate blocks no other run.

Most checks need no training: a succeeded run is recorded as run_experiment records one (a candidate commit, its
run ref, a ledger record). One test trains for real through the tools, on the smoke profile with a tiny budget.
"""

import anyio
import pytest
from mcp import Client

from server.app import create_server
from server.errors import WorkspaceError
from server.gitops import TRAIN, Git
from server.ledger import Ledger, row_status
from server.research import Research, Settings
from server.runs import RunManager
from support import call, git

BUDGET = 2.0


@pytest.fixture
def settings(workspace, prepared_cache):
    return Settings(workspace=workspace, profile="smoke", dataset="sotu", cache=prepared_cache,
                    budget_seconds=BUDGET)


DESCRIBED: dict = {}  # the harness's self-description, asked once: every test's workspace is the same copy


@pytest.fixture
def research(settings):
    """A session on branch autoresearch/cand, as start_session records one (its pins, which cost a subprocess
    each, play no part in keep, discard or rebase_run)."""
    research = Research(settings)
    if DESCRIBED:
        research._harness = dict(DESCRIBED)
    DESCRIBED.update(research.harness)
    research.git.create_branch("autoresearch/cand")
    research.ledger.append({"type": "session", "tag": "cand", "branch": "autoresearch/cand",
                            "base_commit": research.git.head(), "profile": "smoke", "dataset": "sotu", "pins": {}})
    return research


def train_py(research) -> str:
    return (research.root / TRAIN).read_text()


def with_line(source: str, old: str, new: str) -> str:
    assert source.count(old) == 1, old
    return source.replace(old, new)


def first_lines(source: str) -> tuple[str, str]:
    """Two distinct lines of train.py far apart: ideas that touch them merge cleanly."""
    lines = [l for l in source.splitlines() if l.strip() and source.count(l) == 1]
    return lines[0], lines[-1]


def succeeded(research, source: str, description: str, val_bpb: float) -> str:
    """A candidate of `source`, trained and succeeded, as run_experiment leaves one in git and the ledger (without
    spending a budget): made on the branch tip, pinned by its run ref, undecided."""
    parent = research.git.head()
    commit = research.git.commit_candidate(source, parent, description)
    run_id = research.ledger.next_run_id()
    research.git.set_ref(run_id, commit)
    research.ledger.append({"type": "run", "id": run_id, "session": "cand", "commit": commit, "parent": parent,
                            "description": description, "status": "succeeded", "kind": "experiment",
                            "val_bpb": val_bpb, "metrics": {}, "profile": "smoke", "dataset": "sotu",
                            "device": "cpu", "decision": None})
    return run_id


# ------------------------------------------------------------------------------------------ making a candidate


def test_a_candidate_is_a_child_of_the_kept_commit_and_moves_nothing(research):
    ws, repo = research.root, research.git
    kept = repo.head()
    (ws / "program.md").write_text("# the human's notes, staged\n")
    git(ws, "add", "program.md")
    idea = train_py(research) + "\n# an idea\n"
    (ws / TRAIN).write_text(idea)
    commit = repo.commit_candidate(idea, kept, "an idea")
    # the candidate: one commit on top of the kept one, differing in train.py alone
    assert git(ws, "rev-parse", f"{commit}^") == kept
    assert git(ws, "diff", "--name-only", kept, commit) == TRAIN
    assert repo.show_file(commit, TRAIN) == idea
    assert git(ws, "log", "-1", "--format=%s", commit) == "an idea"
    # nothing moved: branch, index (the staged notes stay staged, out of the candidate), working tree
    assert repo.head() == kept and repo.branch() == "autoresearch/cand"
    assert git(ws, "diff", "--cached", "--name-only") == "program.md"
    assert train_py(research) == idea


def test_unchanged_code_is_no_new_commit(research):
    kept = research.git.head()
    assert research.git.commit_candidate(train_py(research), kept, "baseline") == kept


# ------------------------------------------------------------------------------------------ keep


def test_keep_fast_forwards_the_branch_to_the_candidate(research):
    ws = research.root
    kept = research.git.head()
    idea = train_py(research) + "\n# an idea\n"
    (ws / TRAIN).write_text(idea)
    run_id = succeeded(research, idea, "an idea", 1.5)
    assert research.git.head() == kept  # trained, not kept: the branch has not moved

    decision = research.keep(run_id)
    commit = research.ledger.run(run_id)["commit"]
    assert decision.head == decision.kept_commit == commit == git(ws, "rev-parse", "HEAD")
    assert git(ws, "rev-parse", f"{commit}^") == kept  # a fast-forward
    assert git(ws, "status", "--porcelain") == ""  # the scratch copy was the candidate: nothing left over
    assert research.status().kept_commit == commit


def test_keep_after_another_keep_refuses_and_points_to_rebase_run(research):
    source = train_py(research)
    a = succeeded(research, source + "\n# idea a\n", "idea a", 1.4)
    b = succeeded(research, source + "\n# idea b\n", "idea b", 1.3)
    research.keep(b)
    tip = research.git.head()
    with pytest.raises(WorkspaceError) as refusal:
        research.keep(a)
    message = str(refusal.value)
    assert "baseline moved" in message and f"run {b} was kept since" in message
    assert f"rebase_run({a!r})" in message
    assert research.git.head() == tip and research.ledger.run(a)["decision"] is None
    # its result says the same: it was better, but on an older baseline
    result = research.run_result(research.ledger.run(a), research.session_runs(research.session()))
    assert f"rebase_run({a!r})" in result.next_step


def test_keep_of_a_rerun_of_the_kept_code_leaves_the_branch_alone(research):
    kept = research.git.head()
    run_id = succeeded(research, train_py(research), "baseline", 1.5)
    assert research.ledger.run(run_id)["commit"] == kept
    assert research.keep(run_id).head == kept


# ------------------------------------------------------------------------------------------ discard


def test_discard_records_the_decision_and_restores_train_py_only_if_it_holds_the_discarded_code(research):
    ws = research.root
    kept = research.git.head()
    original = train_py(research)
    # a single-run agent: the scratch copy still holds what ran, so it goes back to the kept version
    (ws / TRAIN).write_text(original + "\n# idea a\n")
    a = succeeded(research, original + "\n# idea a\n", "idea a", 1.6)
    decision = research.discard(a)
    assert decision.train_py_restored and decision.head == kept == research.git.head()
    assert train_py(research) == original and git(ws, "status", "--porcelain") == ""
    assert row_status(research.ledger.run(a)) == "discard"
    # an agent who moved on: its newer edits stay, and the answer says so
    b = succeeded(research, original + "\n# idea b\n", "idea b", 1.6)
    (ws / TRAIN).write_text(original + "\n# idea c, not run yet\n")
    decision = research.discard(b)
    assert not decision.train_py_restored and "newer edits" in decision.next_step
    assert train_py(research) == original + "\n# idea c, not run yet\n"
    # every discarded candidate stays reachable
    for run_id in (a, b):
        assert git(ws, "rev-parse", f"refs/autoresearch/runs/{run_id}") == research.ledger.run(run_id)["commit"]


# ------------------------------------------------------------------------------------------ rebase_run


def test_rebase_run_reapplies_the_change_onto_the_kept_version(research):
    ws = research.root
    source = train_py(research)
    top, bottom = first_lines(source)
    a = succeeded(research, with_line(source, top, top + "  # idea a"), "idea a", 1.4)
    b = succeeded(research, with_line(source, bottom, bottom + "  # idea b"), "idea b", 1.3)
    (ws / TRAIN).write_text(with_line(source, bottom, bottom + "  # idea b"))
    research.keep(b)
    rebased = research.rebase_run(a)
    assert rebased.clean and rebased.conflicts == [] and rebased.onto == research.git.head()
    both = with_line(with_line(source, top, top + "  # idea a"), bottom, bottom + "  # idea b")
    assert train_py(research) == both
    assert "+" + top + "  # idea a" in rebased.diff and "idea b" not in rebased.diff  # only a's change is new
    assert "run_experiment" in rebased.next_step
    assert research.git.head() == research.ledger.run(b)["commit"]  # the branch did not move


def test_rebase_run_conflict_comes_back_with_the_hunks_and_loses_nothing(research):
    ws = research.root
    source = train_py(research)
    line, _ = first_lines(source)
    a = succeeded(research, with_line(source, line, line + "  # idea a"), "idea a", 1.4)
    b = succeeded(research, with_line(source, line, line + "  # idea b"), "idea b", 1.3)
    research.keep(b)
    rebased = research.rebase_run(a)
    assert not rebased.clean
    [conflict] = rebased.conflicts
    assert conflict.kept == line + "  # idea b" and conflict.run == line + "  # idea a"
    text = train_py(research).splitlines()
    assert text[conflict.line - 1].startswith("<<<<<<< kept") and f">>>>>>> run {a}" in text
    assert "edit_train" in rebased.next_step
    # both sides are in git, untouched
    assert research.git.show_file(f"refs/autoresearch/runs/{a}", TRAIN) == with_line(source, line, line + "  # idea a")
    assert research.git.show_file("HEAD", TRAIN) == with_line(source, line, line + "  # idea b")


def test_rebase_run_refuses_to_overwrite_edits_no_run_recorded(research):
    ws = research.root
    source = train_py(research)
    a = succeeded(research, source + "\n# idea a\n", "idea a", 1.4)
    (ws / TRAIN).write_text(source + "\n# work in progress\n")
    with pytest.raises(WorkspaceError, match="no run has recorded"):
        research.rebase_run(a)
    assert train_py(research) == source + "\n# work in progress\n"


def test_rebase_run_of_a_run_on_the_kept_commit_brings_its_code_back(research):
    """Re-running a near-miss: its code returns to the scratch copy as it was."""
    ws = research.root
    source = train_py(research)
    a = succeeded(research, source + "\n# idea a\n", "idea a", 1.5)
    research.discard(a)
    assert train_py(research) == source
    assert research.rebase_run(a).clean
    assert train_py(research) == source + "\n# idea a\n"
    assert (ws / TRAIN).read_text() == research.git.show_file(f"refs/autoresearch/runs/{a}", TRAIN)


# ------------------------------------------------------------------------------------------ statuses, recovery


def test_undecided_runs_are_listed_and_queued_is_a_status(research):
    source = train_py(research)
    a = succeeded(research, source + "\n# idea a\n", "idea a", 1.4)
    b = succeeded(research, source + "\n# idea b\n", "idea b", 1.5)
    status = research.status()
    assert status.undecided == [a, b] and status.awaiting_decision == a
    assert research.results(10).undecided == [a, b]
    assert row_status({"status": "queued"}) == "queued"
    assert research.results(10).rows[0].device == "cpu"


def test_a_kill_9_after_the_announcement_leaves_ledger_and_git_agreeing_on_the_candidate(research):
    """The candidate is made before the run is announced, with no ref: a kill -9 before the announcement leaves
    only an unreachable object; after it, recovery finds the candidate in the record and pins it."""
    ws, repo = research.root, research.git
    kept = repo.head()
    commit = repo.commit_candidate(train_py(research) + "\n# idea\n", kept, "killed while starting")
    manager = RunManager(ws, Ledger(ws), Git(ws), profile="smoke", dataset="sotu", cache=research.cache,
                         budget_seconds=BUDGET, device="cpu")
    manager.announce("r0001", "killed while starting", seed=42, session="cand", parent=kept, head=kept,
                     commit=commit)
    Ledger(ws).append({"type": "run", "id": "r0001", "server_create_time": 1.0, "server_pid": 2**22 + 2})
    assert manager.recover() == ["r0001"]
    record = Ledger(ws).run("r0001")
    assert record["status"] == "interrupted" and record["commit"] == commit
    assert git(ws, "rev-parse", "refs/autoresearch/runs/r0001") == commit
    assert repo.head() == kept


# ------------------------------------------------------------------------------------------ through the tools


def test_the_parallel_loop_through_the_tools(settings, workspace):
    """Two real runs: a candidate trains without moving the branch, an undecided one blocks nothing, keep after
    another keep refuses, and the near-miss is rebased onto the kept one."""
    server = create_server(settings)
    train = workspace / TRAIN

    async def main():
        async with Client(server) as client:
            await call(client, "start_session", tag="parallel")
            kept = git(workspace, "rev-parse", "HEAD")
            source = train.read_text()
            top, bottom = first_lines(source)
            idea_a = with_line(source, top, top + "  # idea a")
            idea_b = with_line(source, bottom, bottom + "  # idea b")

            await call(client, "write_train", content=idea_a)
            a = await call(client, "run_experiment", description="idea a")
            assert a["status"] == "succeeded" and a["parent"] == kept and a["device"]
            assert git(workspace, "rev-parse", "HEAD") == kept  # a candidate: the branch has not moved
            assert git(workspace, "rev-parse", f"{a['commit']}^") == kept
            assert train.read_text() == idea_a  # the scratch copy is the agent's

            # a is undecided, and b starts anyway (the agent undoes a's edit and writes the next idea)
            await call(client, "write_train", content=idea_b)
            b = await call(client, "run_experiment", description="idea b", max_wait_seconds=0)
            assert b["status"] in ("queued", "starting", "running")
            status = await call(client, "status")
            assert [r["run_id"] for r in status["runs_in_flight"]] == [b["run_id"]]
            assert status["runs_in_flight"][0]["device"] and status["undecided"] == [a["run_id"]]
            assert [r["run_id"] for r in (await call(client, "results"))["in_flight"]] == [b["run_id"]]
            b = await call(client, "wait_for_run", run_id=b["run_id"])
            assert b["status"] == "succeeded"
            assert (await call(client, "status"))["undecided"] == [a["run_id"], b["run_id"]]

            await call(client, "keep", run_id=b["run_id"])
            assert git(workspace, "rev-parse", "HEAD") == b["commit"]
            refusal = (await client.call_tool("keep", {"run_id": a["run_id"]})).content[0].text
            assert "baseline moved" in refusal and "rebase_run" in refusal

            # the near-miss, re-applied onto the kept version, ready to run again (the next run's parent is b)
            rebased = await call(client, "rebase_run", run_id=a["run_id"])
            assert rebased["clean"] and rebased["onto"] == b["commit"]
            assert train.read_text() == with_line(idea_b, top, top + "  # idea a")
            discarded = await call(client, "discard", run_id=a["run_id"])
            assert not discarded["train_py_restored"]  # the scratch copy holds the rebased code, newer than a's
            assert git(workspace, "rev-parse", "HEAD") == b["commit"]
            rows = (await call(client, "results"))["rows"]
            assert [r["status"] for r in rows] == ["discard", "keep"] and rows[0]["device"]

    anyio.run(main)
