"""The whole research loop against the real server process over stdio, checking git, ledger and results.tsv
after every step, as an agent left alone overnight would leave them."""

import anyio
from mcp import ClientSession, stdio_client

from support import git, ledger_runs, serve_params, server_env


def tsv_rows(workspace) -> list[list[str]]:
    lines = (workspace / "results.tsv").read_text().splitlines()
    assert lines[0] == "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
    return [line.split("\t") for line in lines[1:]]


def test_full_loop_over_stdio(workspace, prepared_cache, tmp_path):
    params = serve_params(workspace, prepared_cache, 2, env=server_env(tmp_path))
    train = workspace / "training" / "train.py"

    async def call(session, name, **arguments):
        result = await session.call_tool(name, arguments)
        assert not result.is_error, result.content[0].text
        return result.structured_content

    async def main():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            init = await session.initialize()
            assert init.server_info.name == "autoresearch"
            assert "keep" in init.instructions

            await call(session, "start_session", tag="overnight")
            start = git(workspace, "rev-parse", "HEAD")
            assert git(workspace, "branch", "--show-current") == "autoresearch/overnight"

            baseline = await call(session, "run_experiment", description="baseline")
            assert baseline["status"] == "succeeded" and baseline["val_bpb"] > 0
            assert tsv_rows(workspace)[-1][3] == "pending"
            await call(session, "keep", run_id=baseline["run_id"])
            assert git(workspace, "rev-parse", "HEAD") == start
            assert ledger_runs(workspace)[baseline["run_id"]]["decision"] == "keep"
            assert tsv_rows(workspace) == [[start[:7], f"{baseline['val_bpb']:.6f}", tsv_rows(workspace)[0][2],
                                            "keep", "baseline"]]

            original = train.read_text()
            await call(session, "write_train", content=original + "\n# first idea\n")
            first = await call(session, "run_experiment", description="first idea")
            assert first["status"] == "succeeded"
            assert git(workspace, "rev-parse", "HEAD") == start  # a candidate: the branch moves only on keep
            await call(session, "keep", run_id=first["run_id"])
            assert git(workspace, "log", "--format=%s", "-2").splitlines() == ["first idea", "autoresearch workspace"]
            kept = git(workspace, "rev-parse", "HEAD")
            assert kept == first["commit"] != start
            assert [r[3] for r in tsv_rows(workspace)] == ["keep", "keep"]

            await call(session, "write_train", content=original + "\n# first idea\n# second idea\n")
            second = await call(session, "run_experiment", description="second idea")
            assert second["status"] == "succeeded"
            assert second["best_val_bpb"] == min(baseline["val_bpb"], first["val_bpb"])
            await call(session, "discard", run_id=second["run_id"])
            assert git(workspace, "rev-parse", "HEAD") == kept
            assert train.read_text() == original + "\n# first idea\n"
            assert git(workspace, "status", "--porcelain") == ""
            # the discarded experiment's code is still reachable
            assert "# second idea" in git(workspace, "show", f"refs/autoresearch/runs/{second['run_id']}:training/train.py")

            assert [r[3] for r in tsv_rows(workspace)] == ["keep", "keep", "discard"]
            runs = ledger_runs(workspace)
            assert [runs[i]["decision"] for i in sorted(runs)] == ["keep", "keep", "discard"]
            assert all(runs[i]["status"] == "succeeded" for i in runs)
            assert runs[second["run_id"]]["parent"] == kept

    anyio.run(main)
