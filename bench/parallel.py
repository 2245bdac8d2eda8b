"""Experiments per hour with one device slot vs two, on this machine and through a private Ray instance, and the
scheduler's overhead per run (local launcher vs Ray actor).

Each configuration is a fresh workspace and server (`serve --devices cpu:N [--executor ray --ray-address local]`
through an in-process MCP client): RUNS candidates are launched at once with max_wait_seconds=0 (with one slot all
but one wait `queued`), then waited for. Experiments per hour = RUNS / (first launch to last result) x 3600.
The scheduler's overhead per run is the run's wall time as the server recorded it minus the trusted pipeline's own
wall time (official timings.total_seconds): for a local run the launcher's start and the result's way back; for a
Ray run also the driver's connection, the actor's placement and start, the node check and the log streaming.

    python -m bench --only parallel --quick     # smoke profile, 3 s budget, 2 runs per configuration
    python -m bench --only parallel             # cpu profile, 60 s budget, 4 runs per configuration
"""

import statistics
import time

import anyio
from mcp import Client

from bench.common import DATASET, Row, call, fmt_s, log, new_workspace
from server.app import create_server
from server.ledger import Ledger
from server.research import Settings

CONFIGS = (("local", "cpu:1"), ("local", "cpu:2"), ("ray", "cpu:1"), ("ray", "cpu:2"))


def measure(executor: str, devices: str, profile: str, budget: float, runs: int, cache) -> dict:
    workspace = new_workspace(f"parallel-{executor}-{devices.replace(':', '')}")
    settings = Settings(workspace=workspace, profile=profile, dataset=DATASET, cache=cache, budget_seconds=budget,
                        devices=devices, executor=executor, ray_address="local" if executor == "ray" else None)
    train = workspace / "training" / "train.py"
    server = create_server(settings)

    async def main():
        t_server = time.perf_counter()  # the server's start (with --ray-address local: the private Ray instance's)
        async with Client(server) as client:
            await call(client, "start_session", tag="bench-parallel")
            source = train.read_text()
            t0 = time.perf_counter()
            ids = []
            for i in range(runs):  # distinct candidates: a comment line each
                await call(client, "write_train", content=source + f"\n# bench candidate {i}\n")
                started = await call(client, "run_experiment", description=f"bench: candidate {i}",
                                     max_wait_seconds=0)
                ids.append(started["run_id"])
            results = [await call(client, "wait_for_run", run_id=run_id) for run_id in ids]
            return results, time.perf_counter() - t0, t0 - t_server

    results, wall, setup = anyio.run(main)
    failed = [r for r in results if r["status"] != "succeeded"]
    if failed:
        r = failed[0]
        raise RuntimeError(f"{executor} {devices}: run {r['run_id']} {r['status']}: {r.get('error')}\n"
                           f"{r.get('log_tail')}")
    records = [Ledger(workspace).run(r["run_id"]) for r in results]
    overheads = [rec["seconds"] - (rec.get("official") or {}).get("timings", {}).get("total_seconds", 0.0)
                 for rec in records]
    return {"wall": wall, "setup": setup, "per_hour": runs / wall * 3600.0, "overheads": overheads,
            "devices": sorted({rec.get("device") for rec in records}), "runs": runs}


def run(opts, shared: dict) -> list[Row]:
    runs = 2 if opts.quick else 4
    profile, budget = opts.loop_profile, opts.budget
    found = {}
    for executor, devices in CONFIGS:
        log(f"parallel: {runs} candidates at once, {executor} executor, --devices {devices}, {profile} profile, "
            f"{budget:g} s budget")
        found[executor, devices] = measure(executor, devices, profile, budget, runs, opts.cache)
    rows = []
    for executor in ("local", "ray"):
        one, two = found[executor, "cpu:1"], found[executor, "cpu:2"]
        where = "this machine" if executor == "local" else "a private Ray instance (--ray-address local)"
        rows.append(Row("parallel", f"experiments per hour, --devices cpu:2, {where} ({runs} runs, {profile}, "
                                    f"{budget:g} s budget)",
                        f"{two['per_hour']:.0f}/h", "the same with --devices cpu:1", f"{one['per_hour']:.0f}/h",
                        f"x{two['per_hour'] / one['per_hour']:.2f}; slots used {', '.join(two['devices'])}; "
                        f"walls {two['wall']:.0f} s vs {one['wall']:.0f} s"))
    local = [o for key, m in found.items() if key[0] == "local" for o in m["overheads"]]
    ray = [o for key, m in found.items() if key[0] == "ray" for o in m["overheads"]]
    rows.append(Row("parallel", "scheduler overhead per run through Ray (run's wall minus the pipeline's own)",
                    fmt_s(statistics.fmean(ray)), "the same for a local run", fmt_s(statistics.fmean(local)),
                    f"Ray adds {statistics.fmean(ray) - statistics.fmean(local):.1f} s per run; medians "
                    f"{statistics.median(ray):.1f} / {statistics.median(local):.1f} s over {len(ray)} / {len(local)} "
                    f"runs; server start + session with a private Ray instance {found['ray', 'cpu:2']['setup']:.0f} s, "
                    f"without {found['local', 'cpu:2']['setup']:.0f} s"))
    return rows
