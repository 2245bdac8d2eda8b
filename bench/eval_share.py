"""Evaluation share of the training budget, per profile.

Measured where the profile runs on this machine: evaluate_bpb on train.py's default model for that profile,
built and (where train.py compiles) compiled exactly as train.py does, after one untimed training step so the
training graph is already compiled as it is at the end of a run; the timed call pays for the eval graph's
compilation like a run does. The weights are freshly initialised: the evaluation's cost does not depend on them.
Profiles that need an accelerator (gpu, small) get an estimate, labelled as such: the model's forward FLOPs
(a third of train.py's estimate_flops) times the profile's eval tokens, at an assumed realised throughput.

Each profile runs in its own interpreter (prepare.py fixes the profile at import):
    AUTORESEARCH_PROFILE=cpu python -m bench.eval_share [--estimate] [--json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

from bench.common import DATASET, Row, child, log

TRAINING_DIR = Path(__file__).resolve().parents[1] / "training"
TARGET_SHARE = 0.10  # issue 2: evaluation costs at most 10% of the budget on the machine class it targets
MEASURED = ("smoke", "cpu")
ESTIMATED = {  # profile: (assumed realised FLOP/s of the eval's forward passes, where the number comes from)
    "gpu": (989.5e12 * 0.398, "H100 bf16 peak at upstream's 39.8% MFU"),
    "small": (5e12, "5 TFLOP/s, a consumer GPU / Apple MPS (prepare.py's sizing)"),
}


def measure() -> dict:
    sys.path.insert(0, str(TRAINING_DIR))
    import torch
    import train
    from prepare import (EVAL_TOKENS, MAX_SEQ_LEN, PROFILE, TIME_BUDGET, Tokenizer, evaluate_bpb, expected_eval,
                         make_dataloader)

    torch.manual_seed(0)
    tokenizer = Tokenizer.load()
    config = train.build_config(train.DEPTH, tokenizer.get_vocab_size(), MAX_SEQ_LEN)
    with torch.device("meta"):
        model = train.GPT(config)
    model.to_empty(device=train.DEVICE)
    model.init_weights(dtype=train.PRECISION.dtype)
    train_model = torch.compile(model, dynamic=False) if train.COMPILE else model
    x, y, _ = next(make_dataloader(tokenizer, train.DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=train.DEVICE))
    t0 = time.perf_counter()
    with train.PRECISION.autocast():
        loss = train_model(x, y)
    loss.backward()  # untimed: the training graph a run has compiled before it evaluates
    model.zero_grad(set_to_none=True)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    with train.PRECISION.autocast():
        bpb = evaluate_bpb(train_model, tokenizer, train.DEVICE_BATCH_SIZE)
    seconds = time.perf_counter() - t0
    rows, scored, _ = expected_eval(tokenizer, MAX_SEQ_LEN, EVAL_TOKENS)  # the same for every batch size
    return {"profile": PROFILE.name, "eval_seconds": seconds, "budget": PROFILE.time_budget,
            "eval_tokens": EVAL_TOKENS, "eval_rows": rows, "eval_tokens_scored": scored, "compiled": train.COMPILE,
            "warm_step_seconds": warm, "val_bpb": bpb,
            "dtype": train.PRECISION.name, "budget_in_force": TIME_BUDGET}


def estimate() -> dict:
    sys.path.insert(0, str(TRAINING_DIR))
    import torch
    import train
    from prepare import EVAL_TOKENS, MAX_SEQ_LEN, PROFILE

    config = train.build_config(train.DEPTH, PROFILE.vocab_size, MAX_SEQ_LEN)
    with torch.device("meta"):
        model = train.GPT(config)
    flops = model.estimate_flops() / 3 * EVAL_TOKENS  # forward only: a third of forward + backward
    rate, source = ESTIMATED[PROFILE.name]
    return {"profile": PROFILE.name, "eval_flops": flops, "eval_seconds": flops / rate, "budget": PROFILE.time_budget,
            "eval_tokens": EVAL_TOKENS, "assumed_flops": rate, "source": source}


def run(opts, shared: dict) -> list[Row]:
    env = {"AUTORESEARCH_DATASET": DATASET, "AUTORESEARCH_CACHE": str(opts.cache), "AUTORESEARCH_TIME_BUDGET": None,
           "AUTORESEARCH_SEED": None, "AUTORESEARCH_RESULT_FILE": None}
    rows, budgets = [], {}
    for profile in MEASURED:
        log(f"eval share: {profile} (train.py's default model, evaluate_bpb timed)")
        r = child("bench.eval_share", env={**env, "AUTORESEARCH_PROFILE": profile})
        share = r["eval_seconds"] / r["budget"]
        budgets[profile] = r["budget"]
        rows.append(Row("eval share", f"{profile}: evaluate_bpb, {r['eval_rows']:,} rows, "
                                      f"{r['eval_tokens_scored']:,} tokens scored "
                                      f"({'compiled' if r['compiled'] else 'eager'}, {r['dtype']})",
                        f"{r['eval_seconds']:.1f} s", f"{profile} training budget", f"{r['budget']} s",
                        f"{100 * share:.1f}% of budget (target <= {100 * TARGET_SHARE:.0f}%)"))
    loop = shared.get("loop")
    real = [r["eval_seconds"] for r in (loop.runs if loop else []) if r.get("eval_seconds") is not None]
    if real and loop.profile in budgets:
        mean = sum(real) / len(real)
        rows.append(Row("eval share", f"{loop.profile}: eval_seconds of the overhead section's real runs "
                                      f"(result files, mean of {len(real)})",
                        f"{mean:.1f} s", f"{loop.profile} training budget", f"{budgets[loop.profile]} s",
                        f"{100 * mean / budgets[loop.profile]:.1f}% of budget; runs: "
                        + ", ".join(f"{x:.1f}" for x in real)))
    for profile in ESTIMATED:
        log(f"eval share: {profile} (estimate)")
        r = child("bench.eval_share", "--estimate", env={**env, "AUTORESEARCH_PROFILE": profile})
        rows.append(Row("eval share", f"{profile}: ESTIMATE, not measurable on this machine "
                                      f"({r['eval_tokens']:,} tokens, {r['eval_flops']:.2g} FLOPs)",
                        f"~{r['eval_seconds']:.0f} s", f"{profile} training budget", f"{r['budget']} s",
                        f"~{100 * r['eval_seconds'] / r['budget']:.1f}% assuming {r['source']}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimate", action="store_true", help="estimate from FLOPs instead of measuring")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args(argv)
    figures = estimate() if args.estimate else measure()
    print(json.dumps(figures) if args.json else figures)


if __name__ == "__main__":
    main()
