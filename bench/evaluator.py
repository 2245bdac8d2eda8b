"""The trusted evaluator's costs, per profile: exporting train.py's default model (training/handover.py), loading
the graph back, the evaluator process's start-up, and its evaluation time against prepare.evaluate_bpb in process
on the same model and rows. Weights are freshly initialised: none of these costs depends on them. Runs on this
machine's CPU whatever the profile (a gpu-size model is exported and loaded, not evaluated: --no-eval).

    AUTORESEARCH_PROFILE=cpu python -m bench.evaluator [--no-eval] [--json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DATASET, Row, child, log

TRAINING_DIR = Path(__file__).resolve().parents[1] / "training"
EVALUATOR = TRAINING_DIR / "evaluator.py"


def run_evaluator(request: dict) -> tuple[dict, float]:
    """The evaluator as the run manager starts it; returns its answer and the process's wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-I", "-B", str(EVALUATOR)], input=json.dumps(request),
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    if not answer.get("ok"):
        raise RuntimeError(f"evaluator: {answer.get('error')}\n{proc.stderr[-2000:]}")
    return answer, wall


def measure(evaluate: bool) -> dict:
    sys.path.insert(0, str(TRAINING_DIR))
    import torch
    import handover
    import prepare
    import train

    torch.manual_seed(0)
    tokenizer = prepare.Tokenizer.load()
    config = train.build_config(train.DEPTH, tokenizer.get_vocab_size(), prepare.MAX_SEQ_LEN)
    model = train.GPT(config)
    model.init_weights()
    model.eval()
    shape = handover.eval_batch_shape(prepare.PROFILE.name, prepare.MAX_SEQ_LEN)
    out = {"profile": prepare.PROFILE.name, "params_M": model.num_params() / 1e6, "shape": list(shape)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.graph"
        t0 = time.perf_counter()
        handover.export_model(model, path, shape, tokenizer.get_vocab_size())
        out["export_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        handover.export_model(model, path, shape, tokenizer.get_vocab_size())
        out["export_seconds_again"] = time.perf_counter() - t0  # torch.export's one-off imports paid
        out["file_MB"] = path.stat().st_size / 2**20
        t0 = time.perf_counter()
        handover.load_program(path).module()
        out["load_seconds"] = time.perf_counter() - t0
        if not evaluate:
            return out
        pins = json.loads(subprocess.run(
            [sys.executable, "-I", str(EVALUATOR), "--pins", "--profile", prepare.PROFILE.name, "--dataset",
             prepare.DATASET_SOURCE, "--cache", str(prepare.CACHE_DIR)], capture_output=True, text=True,
            check=True).stdout)
        request = {"graph": str(path), "profile": prepare.PROFILE.name, "dataset": prepare.DATASET_SOURCE,
                   "cache": str(prepare.CACHE_DIR), "pins": pins}
        answer, wall = run_evaluator(request)
        out.update(evaluator=answer, evaluator_wall_seconds=wall)
        t0 = time.perf_counter()
        with torch.no_grad():
            out["in_process_bpb"] = prepare.evaluate_bpb(model, tokenizer, shape[0])
        out["in_process_eval_seconds"] = time.perf_counter() - t0
    return out


def evaluator_rows(cache: Path, profiles=("smoke", "cpu"), export_only=("gpu",)) -> list[Row]:
    """Rows for `python -m bench` (section `evaluator`)."""
    rows = []
    for profile in (*profiles, *export_only):
        log(f"evaluator: {profile} profile's default model")
        args = ["--no-eval"] if profile in export_only else []
        f = child("bench.evaluator", *args, env={"AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_PROFILE": profile,
                                                  "AUTORESEARCH_DATASET": DATASET, "AUTORESEARCH_TIME_BUDGET": None})
        model = f"{profile} profile's model ({f['params_M']:.1f}M params, batch {f['shape'][0]} x {f['shape'][1]})"
        rows.append(Row("evaluator", f"hand-over export, {model}", f"{f['export_seconds_again']:.2f} s",
                        "loading it back", f"{f['load_seconds']:.2f} s",
                        f"{f['file_MB']:.0f} MB; first export in a process {f['export_seconds']:.2f} s"))
        if "evaluator" in f:
            e = f["evaluator"]
            startup = f["evaluator_wall_seconds"] - e["eval_seconds"] - e["load_seconds"]
            rows.append(Row("evaluator", f"evaluator start-up (python -I, pins checked, data copied), {profile}",
                            f"{startup:.1f} s", "", "", f"of which imports {e['startup_seconds']:.1f} s"))
            rows.append(Row("evaluator", f"trusted evaluation, {model}", f"{e['eval_seconds']:.1f} s",
                            "evaluate_bpb in process, same rows", f"{f['in_process_eval_seconds']:.1f} s",
                            f"{e['probe_rows']} probe rows; val_bpb {e['val_bpb']:.6f} vs {f['in_process_bpb']:.6f}"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-eval", action="store_true", help="export and load only")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    figures = measure(not args.no_eval)
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
