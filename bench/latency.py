"""Tool latency: p50/p95 of the tools that do not train, called through a real in-process MCP client against
create_server, in a workspace whose ledger holds 1,000 runs, against the same with 10 runs.

The ledger is generated the way the server writes it (a start record, an end record and a decision per run; a
tenth of the runs crashed with a 40-line log tail; improvements kept, the rest discarded), appended to a real
session started through start_session. Runs point at the session's base commit, a real one, so diff_train and
discard work against it; keep and discard need a succeeded, undecided run at HEAD, so before each of their calls
(untimed) train.py is changed, committed with server.gitops.Git, pinned under refs/autoresearch/runs/ and recorded
in the ledger, exactly as start_run leaves it. Each of those adds a run, so the ledgers grow by 2 x the keep/discard
samples during the measurement (noted in the table).
"""

import json
import random
import time

import anyio
from mcp import Client

from bench.common import DATASET, Row, call, log, new_workspace, percentile
from server.app import create_server
from server.gitops import TRAIN
from server.research import Settings

READ_TOOLS = ("status", "read_file", "diff_train", "results")
TOOLS = ("status", "read_file", "edit_train", "diff_train", "keep", "discard", "results")
WARMUP_CALLS = 2
SUMMARY_KEYS = ("training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M", "num_steps",
                "num_params_M", "depth")
IDEAS = ("raise MATRIX_LR", "lower EMBEDDING_LR", "depth 5", "window pattern SSL", "warmdown 0.6", "no value embeds",
         "wider MLP", "QK-norm off", "softcap 20", "batch 2**14", "Muon momentum 0.9", "weight decay 0.1")


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


def generated_runs(n: int, session: str, commit: str, profile: str, budget: float) -> list[dict]:
    """n runs as the server records them: start record, end record, decision record."""
    rng = random.Random(n)
    records, best, t = [], 1.80, time.time() - n * (budget + 60)
    for i in range(1, n + 1):
        run_id, idea = f"r{i:04d}", rng.choice(IDEAS)
        records.append({
            "time": iso(t), "type": "run", "id": run_id, "session": session, "commit": commit, "parent": commit,
            "description": f"{idea} (try {i})", "status": "running", "kind": "experiment", "val_bpb": None,
            "metrics": {}, "profile": profile, "dataset": DATASET, "device": "cpu", "seed": 42,
            "budget_seconds": budget, "timeout_seconds": 2 * budget + 120, "started_at": iso(t), "ended_at": None,
            "pid": 10_000 + i, "pgid": 10_000 + i, "proc_start_ticks": 1_000_000 + i, "server_pid": 999,
            "server_start_ticks": 1000, "error": None, "log_tail": None, "decision": None,
        })
        t += budget + 50
        if rng.random() < 0.1:
            tail = "\n".join([f"step {s:05d} (50.0%) | loss: 4.1 | dt: 410ms | remaining: 150s" for s in range(30)]
                             + ["Traceback (most recent call last):", '  File "training/train.py", line 212',
                                "    y = attention(q, k, v, window)", "RuntimeError: shape mismatch"] * 2 + [""] * 2)
            end = {"status": "crashed", "val_bpb": None, "metrics": {}, "exit_code": 1, "log_tail": tail,
                   "error": "training/train.py exited with code 1: RuntimeError: shape mismatch (training/train.py "
                            "line 212)"}
            decision = "discard"
        else:
            val = best + rng.gauss(0.004, 0.01)
            metrics = {k: round(rng.uniform(1, 500), 1) for k in SUMMARY_KEYS}
            metrics.update(device="cpu", profile=profile, dataset=DATASET, seed=42)
            end = {"status": "succeeded", "val_bpb": val, "metrics": metrics, "exit_code": 0, "log_tail": None,
                   "error": None}
            decision = "keep" if val < best else "discard"
            best = min(best, val)
        records.append({"time": iso(t), "type": "run", "id": run_id, "ended_at": iso(t), "seconds": budget + 45,
                        **end})
        records.append({"time": iso(t + 5), "type": "run", "id": run_id, "decision": decision})
        t += 10
    return records


def pending_run(research, i: int) -> str:
    """A succeeded, undecided run at HEAD, as start_run and the monitor leave it (untimed setup)."""
    path = research.root / TRAIN
    path.write_text(path.read_text() + f"# bench change {i}\n")
    commit = research.git.commit_train(f"bench change {i}")
    run_id = research.ledger.next_run_id()
    research.git.set_ref(run_id, commit)
    session = research.session()
    research.ledger.append({
        "type": "run", "id": run_id, "session": session["tag"], "commit": commit, "parent": commit,
        "description": f"bench change {i}", "status": "succeeded", "kind": "experiment", "val_bpb": 1.7,
        "metrics": {}, "profile": session["profile"], "dataset": DATASET, "seed": 42, "decision": None,
    })
    return run_id


def unique_line(text: str) -> str:
    """A line of train.py that occurs exactly once: what edit_train replaces back and forth."""
    for line in text.splitlines():
        if len(line.strip()) > 20 and text.count(line) == 1:
            return line
    raise RuntimeError("train.py has no unique line to edit")


async def measure(n_runs: int, samples: int, decisions: int, opts) -> dict[str, list[float]]:
    workspace = new_workspace(f"latency{n_runs}")
    server = create_server(Settings(workspace=workspace, profile=opts.loop_profile, dataset=DATASET,
                                    cache=opts.cache, budget_seconds=opts.budget))
    research = server.research
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}

    async def timed(tool: str, **arguments):
        t0 = time.perf_counter()
        await call(client, tool, **arguments)
        times[tool].append(1000 * (time.perf_counter() - t0))

    async with Client(server) as client:
        await call(client, "start_session", tag="latency")
        session = research.session()
        records = generated_runs(n_runs, "latency", session["base_commit"], session["profile"],
                                 session["budget_seconds"])
        with open(research.ledger.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        research.ledger.write_results_tsv()
        assert len(research.session_runs(session)) == n_runs

        # edit_train back and forth, ending with train.py edited (the state diff_train and status usually see)
        original = (research.root / TRAIN).read_text()
        line = unique_line(original)
        edits = [(line, line + "  # bench"), (line + "  # bench", line)]
        for i in range(WARMUP_CALLS):
            await call(client, "edit_train", old_text=edits[i % 2][0], new_text=edits[i % 2][1])
        for i in range(samples + 1):  # odd count: ends edited
            await timed("edit_train", old_text=edits[i % 2][0], new_text=edits[i % 2][1])
        for tool in READ_TOOLS:
            for _ in range(WARMUP_CALLS):
                await call(client, tool)
            for _ in range(samples):
                await timed(tool)
        await call(client, "edit_train", old_text=edits[1][0], new_text=edits[1][1])  # back to the committed file
        for tool in ("keep", "discard"):
            for i in range(decisions):
                run_id = pending_run(research, i)
                await timed(tool, run_id=run_id)
        times["runs_at_end"] = len(research.session_runs(research.session()))
    return times


def run(opts, shared: dict) -> list[Row]:
    samples, decisions = (20, 5) if opts.quick else (50, 20)

    async def main():
        results = {}
        for n in (10, 1000):
            log(f"latency: {n} runs in the ledger, {samples} calls per tool ({decisions} for keep/discard)")
            results[n] = await measure(n, samples, decisions, opts)
        return results

    results = anyio.run(main)
    rows = []
    for tool in TOOLS:
        big, small = results[1000][tool], results[10][tool]
        p50, p95 = percentile(big, 50), percentile(big, 95)
        q50, q95 = percentile(small, 50), percentile(small, 95)
        rows.append(Row("latency", f"{tool} p50 / p95, 1,000-run ledger", f"{p50:.1f} / {p95:.1f} ms",
                        "same, 10-run ledger", f"{q50:.1f} / {q95:.1f} ms",
                        f"p50 x{p50 / q50:.2f}; {len(big)} calls"))
    rows[-1].note += (f"; ledgers end at {results[1000]['runs_at_end']:,} and {results[10]['runs_at_end']} runs "
                      "(keep/discard add one each)")
    return rows
