"""Loop overhead: the wall time of the `run_experiment` tool (call to answer, through a real in-process MCP client)
against running `python training/train.py` directly with the same profile, dataset, budget, seed and the very
environment the server builds (server.harness.training_env), in the same fresh workspace.

Order: untimed warm-up runs, one each way (torch.compile's on-disk caches, the evaluator's compiled kernels, the
page cache), then direct, server, server, direct (ABBA, so a linear drift of the machine cancels out of the means).
Everything the server adds shows up in the difference: git checks and commit, pre-flight, the ledger, process
bookkeeping and the monitor's polling, and the trusted pipeline (server/pipeline.py): the feeder beside the
trainer, the sandbox, the hand-over export and the evaluator's own process (its start-up and probe rows) where the
direct run evaluates in process.
"""

import json
import re
import statistics
import subprocess
import time
from pathlib import Path

import anyio
from mcp import Client

from bench.common import DATASET, Row, call, fmt_s, log, new_workspace
from server.app import create_server
from server.ledger import Ledger
from server.research import DEFAULT_SEED, Settings
from server.workspace import training_env

SUMMARY_LINE = re.compile(r"^([A-Za-z_]\w*):\s+(.*?)\s*$")
PEAK_LINE = re.compile(r"peak FLOP/s for MFU:\s*([-+\d.eE]+)")
TARGET_RATIO = 1.05
WARMUP_BUDGET = 1.0


def parse_summary(text: str) -> dict:
    """key: value lines of the last `---` block train.py prints."""
    block = text.split("\n---\n")[-1] if "\n---\n" in text else ""
    summary = {}
    for line in block.splitlines():
        if m := SUMMARY_LINE.match(line):
            try:
                summary[m.group(1)] = float(m.group(2))
            except ValueError:
                summary[m.group(1)] = m.group(2)
    return summary


def peak_flops(text: str) -> float | None:
    """The matmul peak train.py measured at its start (the denominator of its mfu_percent)."""
    m = PEAK_LINE.search(text)
    return float(m.group(1)) if m else None


class Loop:
    """A fresh workspace with a research session, driven through create_server and an in-process client."""

    def __init__(self, profile: str, budget: float, cache: Path):
        self.profile, self.budget, self.cache = profile, budget, cache
        self.workspace = new_workspace("loop")
        self.settings = Settings(workspace=self.workspace, profile=profile, dataset=DATASET, cache=cache,
                                 budget_seconds=budget)
        self.kept = False  # a baseline run has been kept (measure_noise needs one)
        self.runs: list[dict] = []  # every timed run: mode, seconds, val_bpb, eval_seconds, summary

    def server(self):
        return create_server(self.settings)

    def direct(self, index: int, budget: float | None = None) -> dict:
        """train.py started the way the server starts it (same interpreter, cwd, environment), timed to exit."""
        run_dir = Path(".autoresearch", "bench", f"direct-{index}")
        (self.workspace / run_dir).mkdir(parents=True, exist_ok=True)
        result_file = run_dir / "result.json"
        env = training_env(self.workspace, profile=self.profile, dataset=DATASET, cache=self.cache,
                           budget=budget or self.budget, result_file=result_file, seed=DEFAULT_SEED)
        log_path = self.workspace / run_dir / "log.txt"
        t0 = time.perf_counter()
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([self.settings.python, "training/train.py"], cwd=self.workspace, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        text = log_path.read_text(errors="replace")
        if rc:
            raise RuntimeError(f"direct train.py run exited {rc}:\n{text[-2000:]}")
        result = json.loads((self.workspace / result_file).read_text())
        return {"mode": "direct", "seconds": seconds, "val_bpb": result["val_bpb"],
                "eval_seconds": result.get("eval_seconds"), "summary": parse_summary(text), "peak": peak_flops(text)}

    async def through_server(self, client, index: int) -> dict:
        t0 = time.perf_counter()
        run = await call(client, "run_experiment", description=f"bench: overhead run {index}")
        seconds = time.perf_counter() - t0
        if run["status"] != "succeeded":
            raise RuntimeError(f"run {run['run_id']} {run['status']}: {run.get('error')}\n{run.get('log_tail')}")
        run_dir = self.workspace / ".autoresearch" / "runs" / run["run_id"]
        text = (run_dir / "log.txt").read_text(errors="replace")
        # keep the first (the baseline measure_noise re-runs), discard the rest: the loop an agent would drive
        await call(client, "discard" if self.kept else "keep", run_id=run["run_id"])
        self.kept = True
        # the trusted evaluator's own scoring time (the official result; no result file in the run dir is read)
        record = Ledger(self.workspace).run(run["run_id"])
        return {"mode": "server", "seconds": seconds, "val_bpb": run["val_bpb"],
                "eval_seconds": (run.get("metrics") or {}).get("eval_seconds"), "summary": run.get("metrics") or {},
                "peak": peak_flops(text), "phases": record.get("phase_seconds") or {},
                "evaluator": (record.get("official") or {}).get("evaluator") or {}}


def mean_of(runs: list[dict], figure) -> float:
    values = [v for v in (figure(r) for r in runs) if isinstance(v, (int, float))]
    return statistics.fmean(values) if values else float("nan")


def run(opts, shared: dict) -> list[Row]:
    loop = Loop(opts.loop_profile, opts.budget, opts.cache)
    shared["loop"] = loop
    order = ["direct", "server", "server", "direct"] * (opts.pairs // 2)
    if opts.pairs % 2:
        order += ["direct", "server"]

    async def main():
        async with Client(loop.server()) as client:
            await call(client, "start_session", tag="bench")
            # warm both ways alike (torch.compile's caches: the direct run's in the user's temp folder, the server's
            # in the workspace, and the evaluator's kernels), as every experiment of a night but the first finds them
            log(f"overhead: warm-up runs ({opts.loop_profile}, direct {WARMUP_BUDGET:g} s and server "
                f"{opts.budget:g} s budget, untimed)")
            await anyio.to_thread.run_sync(loop.direct, 0, WARMUP_BUDGET)
            await loop.through_server(client, 0)
            for i, mode in enumerate(order, 1):
                log(f"overhead: run {i}/{len(order)} {mode} ({opts.loop_profile}, {opts.budget:g} s budget)")
                if mode == "direct":
                    record = await anyio.to_thread.run_sync(loop.direct, i)
                else:
                    record = await loop.through_server(client, i)
                log(f"overhead:   {record['seconds']:.2f} s, val_bpb {record['val_bpb']:.4f}")
                loop.runs.append(record)

    anyio.run(main)
    server = [r["seconds"] for r in loop.runs if r["mode"] == "server"]
    direct = [r["seconds"] for r in loop.runs if r["mode"] == "direct"]
    s, d = statistics.fmean(server), statistics.fmean(direct)
    ratio = s / d
    what = f"{opts.loop_profile} profile, {opts.budget:g} s budget"
    verdict = "meets" if ratio <= TARGET_RATIO else "misses"
    pairs = ", ".join(f"{r['mode'][0].upper()} {r['seconds']:.1f}" for r in loop.runs)
    return [
        Row("overhead", f"run_experiment, call to answer ({what}, mean of {len(server)})", fmt_s(s),
            f"python training/train.py directly (mean of {len(direct)})", fmt_s(d),
            f"ratio {ratio:.4f} ({verdict} target <= {TARGET_RATIO}); in run order (D direct, S server): {pairs} s"),
        Row("overhead", "difference, server - direct", f"{s - d:+.2f} s", "target", "a second or two",
            f"per run: train.py's own total_seconds mean "
            f"{statistics.fmean(r['summary'].get('total_seconds', float('nan')) for r in loop.runs):.1f} s"),
        *evaluator_rows(loop.runs),
    ]


def evaluator_rows(runs: list[dict]) -> list[Row]:
    """What the trusted pipeline spends where the direct run evaluates in process: the hand-over export, the
    evaluator's start-up (its imports, pins and data copy, mostly overlapping the export) and its graph load, and
    its scoring against the direct run's in-process evaluate_bpb."""
    server = [r for r in runs if r["mode"] == "server"]
    direct = [r for r in runs if r["mode"] == "direct"]

    def evaluator(key: str) -> float:
        return mean_of(server, lambda r: r["evaluator"].get(key))

    return [
        Row("overhead", "of which the hand-over export and the evaluator's graph load (phase: exporting, server "
            "runs' mean)", fmt_s(mean_of(server, lambda r: r["phases"].get("exporting"))), "", "",
            f"the direct run exports nothing; graph load {evaluator('load_seconds'):.1f} s"),
        Row("overhead", "of which the evaluator's start-up (server runs' mean)", fmt_s(evaluator("startup_seconds")),
            "", "", "imports, pins checked, data copied: started once the trainer greets the feeder, it "
                    "overlaps the trainer's compilation"),
        Row("overhead", "trusted evaluation, scoring (server runs' mean)", fmt_s(evaluator("eval_seconds")),
            "evaluate_bpb in process (direct runs' mean)", fmt_s(mean_of(direct, lambda r: r["eval_seconds"])),
            "the evaluator adds causality probe rows and scores in its own process"),
    ]
