"""The command line as a person meets it: bad invocations answer in a line or two with what to type, never a
traceback (unless asked for); `config` prints a client set-up that works from a venv that is not on PATH."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from server.cli import concise, workspace_error_in
from server.errors import WorkspaceError

SCRIPT = Path(sys.executable).parent / "autoresearch-mcp"  # the console script of this installation
BARE_PATH = "/usr/bin:/bin"  # a shell whose PATH does not hold the venv


def cli(*args, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def output_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


@pytest.fixture
def not_a_workspace(tmp_path):
    """A git repository with a commit but none of the workspace files."""
    repo = tmp_path / "some-repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    return repo


def bad_invocations(workspace, not_a_workspace):
    """(arguments, cwd, text the answer must contain) for every case the issue lists, and their neighbours."""
    return [
        (["serve", "--profile", "nonsense", "--workspace", str(workspace)], None, "nonsense"),
        (["serve"], not_a_workspace, "autoresearch-mcp init"),
        (["serve", "--workspace", str(not_a_workspace), "--transport", "http"], None, "autoresearch-mcp init"),
        (["serve", "--workspace", "/nonexistent"], None, "/nonexistent is not a directory"),
        (["results", "--workspace", "/nonexistent"], None, "/nonexistent is not a directory"),
        (["plot", "--workspace", "/nonexistent"], None, "/nonexistent is not a directory"),
        (["dashboard", "--workspace", "/nonexistent"], None, "/nonexistent is not a directory"),
        (["config", "claude", "--workspace", "/nonexistent"], None, "/nonexistent is not a directory"),
        (["results", "--workspace", str(workspace)], None, "No research session"),
        (["results", "--workspace", str(not_a_workspace)], None, "No research session"),
        (["init", str(workspace)], None, "not empty"),
    ]


def test_bad_invocations_answer_in_three_lines_without_a_traceback(workspace, not_a_workspace, prepared_cache,
                                                                   tally):
    env = {"AUTORESEARCH_CACHE": str(prepared_cache), "AUTORESEARCH_DEBUG": ""}
    for args, cwd, expected in bad_invocations(workspace, not_a_workspace):
        done = cli(*args, cwd=cwd, env=env)
        lines = output_lines(done)
        shown = f"{args}:\n" + "\n".join(lines)
        assert done.returncode != 0, shown
        assert 1 <= len(lines) <= 3, shown
        assert "Traceback" not in done.stderr + done.stdout, shown
        assert lines[0].startswith("error: "), shown
        assert expected in "\n".join(lines), shown
    tally.bad_input(len(bad_invocations(workspace, not_a_workspace)))


@pytest.mark.parametrize("how", [["--debug"], ["results", "--debug"], "env"])
def test_debug_shows_the_traceback(how):
    args = ["results", "--workspace", "/nonexistent"]
    if how == "env":
        done = cli(*args, env={"AUTORESEARCH_DEBUG": "1"})
    elif how[0] == "--debug":
        done = cli("--debug", *args)
    else:
        done = cli(*args, "--debug")
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "/nonexistent is not a directory" in done.stderr


def test_errors_are_found_inside_exception_groups_and_kept_short():
    inner = WorkspaceError("prepare.py --describe failed (exit 2):\nerror: unknown profile 'x'\nRun it by hand: cmd")
    group = BaseExceptionGroup("unhandled errors in a TaskGroup", [ExceptionGroup("nested", [inner])])
    assert workspace_error_in(group) is inner
    assert workspace_error_in(RuntimeError("x")) is None
    assert concise(str(inner)) == "unknown profile 'x'\nRun it by hand: cmd"
    assert concise("one line") == "one line"


def run_script(*args, cwd=None) -> subprocess.CompletedProcess:
    """The installed console script run by its absolute path from a shell whose PATH lacks the venv."""
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "PATH": BARE_PATH})


@pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is installed with pip install -e .")
def test_config_claude_prints_the_command_with_absolute_paths(workspace):
    done = run_script("config", "claude", "--workspace", str(workspace))
    assert done.returncode == 0, done.stderr
    command = shlex.split(done.stdout)
    assert command[:5] == ["claude", "mcp", "add", "autoresearch", "--"]
    assert command[5] == str(SCRIPT) and Path(command[5]).is_absolute()
    assert command[6:] == ["serve", "--workspace", str(workspace)]
    assert "claude mcp list" in done.stderr  # the hint goes to stderr; stdout is exactly the command


@pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is installed with pip install -e .")
def test_config_json_cursor_and_vscode(workspace):
    for client, table in (("json", "mcpServers"), ("cursor", "mcpServers"), ("vscode", "servers")):
        done = run_script("config", client, "--profile", "smoke", cwd=workspace)  # --workspace: the cwd
        assert done.returncode == 0, done.stderr
        entry = json.loads(done.stdout)[table]["autoresearch"]
        assert entry["command"] == str(SCRIPT)
        assert entry["args"] == ["serve", "--workspace", str(workspace), "--profile", "smoke"]
        assert entry.get("type") == ("stdio" if client == "vscode" else None)


@pytest.mark.skipif(not SCRIPT.exists(), reason="the console script is installed with pip install -e .")
def test_the_printed_config_connects_without_the_venv_on_path(workspace, prepared_cache):
    """What `claude mcp add` would store, started the way a client starts it: a bare PATH, the printed command."""
    done = run_script("config", "json", "--workspace", str(workspace), "--cache", str(prepared_cache),
                      "--profile", "smoke", "--dataset", "sotu")
    entry = json.loads(done.stdout)["mcpServers"]["autoresearch"]
    params = StdioServerParameters(command=entry["command"], args=entry["args"],
                                   env={"PATH": BARE_PATH, "HOME": os.environ.get("HOME", "/tmp")})

    async def main():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            status = await session.call_tool("status", {})
            assert not status.is_error, status.content[0].text
            return status.structured_content

    status = anyio.run(main)
    assert status["profile"]["name"] == "smoke" and status["workspace"] == str(workspace)


def test_the_results_table_shows_timed_out_as_itself(workspace, capsys):
    from server.ledger import Ledger
    from server.report import print_results

    ledger = Ledger(workspace)
    ledger.append({"type": "session", "tag": "t", "branch": "main", "base_commit": "0" * 40})
    for run_id, status, decision in (("r0001", "succeeded", "keep"), ("r0002", "timed_out", None),
                                     ("r0003", "crashed", None), ("r0004", "succeeded", "discard")):
        ledger.append({"type": "run", "id": run_id, "session": "t", "commit": "a" * 40, "status": status,
                       "decision": decision, "val_bpb": 1.5 if status == "succeeded" else None,
                       "description": run_id})
    assert print_results(workspace, "t", 0, False) == 0
    table = {line.split()[0]: line.split()[4] for line in capsys.readouterr().out.splitlines()
             if line.startswith("r000")}
    assert table == {"r0001": "keep", "r0002": "timed_out", "r0003": "crashed", "r0004": "discard"}
    # results.tsv keeps upstream's vocabulary
    assert [row.split("\t")[3] for row in ledger.results_tsv().splitlines()[1:]] == ["keep", "crash", "crash",
                                                                                       "discard"]


def test_the_results_table_names_the_node_once_runs_span_several(workspace, capsys):
    """On one machine the device says where a run trained; on a Ray cluster, node/device."""
    from server.ledger import Ledger
    from server.report import print_results

    ledger = Ledger(workspace)
    ledger.append({"type": "session", "tag": "t", "branch": "main", "base_commit": "0" * 40})
    ledger.append({"type": "run", "id": "r0001", "session": "t", "commit": "a" * 40, "status": "succeeded",
                   "val_bpb": 1.5, "description": "one", "device": "cuda:0", "node": "gpu-node-a"})
    assert print_results(workspace, "t", 0, False) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[5] == "cuda:0"
    ledger.append({"type": "run", "id": "r0002", "session": "t", "commit": "b" * 40, "status": "crashed",
                   "description": "two", "device": "cuda:3", "node": "gpu-node-b"})
    assert print_results(workspace, "t", 0, False) == 0
    rows = {line.split()[0]: line.split()[5] for line in capsys.readouterr().out.splitlines()
            if line.startswith("r000")}
    assert rows == {"r0001": "gpu-node-a/cuda:0", "r0002": "gpu-node-b/cuda:3"}
