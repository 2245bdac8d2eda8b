"""The noise floor: the server's own measure_noise tool (seeded re-runs of the kept commit, recorded in the ledger
like any run) at the bench budget, on the loop profile. Reuses the overhead section's workspace and kept
baseline when that section ran in the same invocation (the baseline's seed-42 value is one of the samples), else
runs and keeps a baseline first.
"""

import statistics

import anyio
from mcp import Client

from bench.common import DATASET, Row, call, log
from bench.overhead import Loop
from server.ledger import Ledger


def run(opts, shared: dict) -> list[Row]:
    loop = shared.get("loop")
    if loop is None or not loop.kept:
        loop = Loop(opts.loop_profile, opts.budget, opts.cache)

    async def main():
        async with Client(loop.server()) as client:
            await call(client, "start_session", tag="bench", resume=loop.kept)
            if not loop.kept:
                log(f"noise: baseline run ({opts.loop_profile}, {opts.budget:g} s budget)")
                await loop.through_server(client, 0)
            log(f"noise: measure_noise(repeats={opts.repeats}) ({opts.loop_profile}, {opts.budget:g} s budget)")
            return await call(client, "measure_noise", repeats=opts.repeats)

    floor = anyio.run(main)
    record = Ledger(loop.workspace).noise(loop.profile, DATASET)
    values = record["values"] if record else []
    what = f"{loop.profile} profile, {loop.budget:g} s budget"
    rows = [
        Row("noise", f"val_bpb std over seeds (measure_noise, {what}, n={floor['repeats']})", f"{floor['std']:.5f}",
            "2 sigma = the within_noise threshold", f"{2 * floor['std']:.5f}",
            f"mean {floor['mean']:.4f}; values " + ", ".join(f"{v:.4f}" for v in values)),
    ]
    same_seed = [r["val_bpb"] for r in loop.runs]
    if len(same_seed) > 1:
        rows.append(Row("noise", f"val_bpb std of same-seed runs (overhead section, n={len(same_seed)})",
                        f"{statistics.stdev(same_seed):.5f}", "seeded std above", f"{floor['std']:.5f}",
                        "same seed 42; differs only through wall-clock step counts"))
    return rows
