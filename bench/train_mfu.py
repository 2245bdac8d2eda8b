"""
Training throughput of the cpu profile's default model as a fraction of this machine's matmul peak (MFU).

The peak is measured in the same run (best of square bf16 and fp32 matmuls at a few sizes), then full training
steps (forward, backward, optimizer, exactly as train.py's loop does them) run on random tokens, so no prepared
dataset is needed. The machine should be otherwise idle: the peak and the steps compete for the same cores.
Prints figures; asserts nothing.
Usage: python -m bench.train_mfu
"""

import os
import sys
import time
from pathlib import Path

TRAINING_DIR = Path(__file__).resolve().parents[1] / "training"
MEASURE_SECONDS = 20.0


def measure(seconds=MEASURE_SECONDS):
    """Print the figures as they come and return them (FLOP/s, tokens/s, MFU in %)."""
    # The profile is fixed when prepare.py is imported, so pin it before train.py (which imports prepare) loads
    os.environ["AUTORESEARCH_PROFILE"] = "cpu"
    sys.path.insert(0, str(TRAINING_DIR))
    import torch
    import runtime
    import train  # model and optimizer definitions; the training loop only runs when train.py is a script

    assert train.PROFILE.name == "cpu", f"prepare.py was already imported with profile {train.PROFILE.name}"
    device, precision = runtime.DEVICE, train.PRECISION
    print(f"threads: {torch.get_num_threads()} | device: {device.type}")
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        peaks[dtype] = 0.0
        for n in (512, 1024, 2048):
            peaks[dtype] = max(peaks[dtype], runtime.measure_matmul_flops(dtype, device.type, size=n, seconds=0.5))
            if dtype != torch.float32 and peaks[dtype] < 0.1 * peaks[torch.float32]:
                break  # emulated: a 2048^2 matmul would take tens of seconds to say the same
        print(f"matmul peak {str(dtype).removeprefix('torch.'):8s}: {peaks[dtype] / 1e9:7.1f} GFLOP/s")
    peak = peaks[precision.dtype]

    torch.manual_seed(0)
    T = train.MAX_SEQ_LEN
    config = train.build_config(train.DEPTH, train.PROFILE.vocab_size, T)
    model = train.GPT(config).to(device)
    model.init_weights(dtype=precision.dtype)
    runtime.build_attention_masks(T, model.windows)
    optimizers = train.setup_optimizers(model)
    train_model = torch.compile(model, dynamic=False) if train.COMPILE else model
    flops_per_token = model.estimate_flops()
    grad_accum_steps = train.TOTAL_BATCH_SIZE // (train.DEVICE_BATCH_SIZE * T)
    x = torch.randint(0, config.vocab_size, (train.DEVICE_BATCH_SIZE, T), device=device)
    y = torch.randint(0, config.vocab_size, (train.DEVICE_BATCH_SIZE, T), device=device)
    print(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head}, context {T}, "
          f"vocab {config.vocab_size} | {model.num_params() / 1e6:.2f}M params | {flops_per_token / 1e6:.1f} MFLOP/token")
    print(f"batch: {train.TOTAL_BATCH_SIZE:,} tokens/step = {grad_accum_steps} x {train.DEVICE_BATCH_SIZE} x {T} "
          f"| precision: {precision.name}")

    def step():
        t0 = time.perf_counter()
        for _ in range(grad_accum_steps):
            with precision.autocast():
                loss = train_model(x, y)
            (loss / grad_accum_steps).backward()
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        return t1 - t0, time.perf_counter() - t1

    t0 = time.perf_counter()
    for _ in range(2):  # compilation and allocator warm-up, as train.py's untimed steps
        step()
    print(f"warm-up (compile: {train.COMPILE}): {time.perf_counter() - t0:.1f} s")
    times = []
    t_begin = time.perf_counter()
    while time.perf_counter() - t_begin < seconds:
        times.append(step())
    steps = len(times)
    fwdbwd = sum(t for t, _ in times)
    optim = sum(t for _, t in times)
    tokens = steps * train.TOTAL_BATCH_SIZE
    achieved = flops_per_token * tokens / (fwdbwd + optim)
    print(f"steps: {steps} | {1000 * (fwdbwd + optim) / steps:.0f} ms/step "
          f"({1000 * fwdbwd / steps:.0f} forward+backward, {1000 * optim / steps:.0f} optimizer)")
    print(f"throughput: {tokens / (fwdbwd + optim):,.0f} tok/s | {achieved / 1e9:.1f} GFLOP/s")
    print(f"MFU: {100 * achieved / peak:.1f}% of the measured {precision.name} matmul peak ({peak / 1e9:.1f} GFLOP/s)")
    return {"dtype": precision.name, "threads": torch.get_num_threads(),
            "peak_fp32": peaks[torch.float32], "peak_bf16": peaks[torch.bfloat16], "peak": peak,
            "achieved": achieved, "mfu_percent": 100 * achieved / peak, "tokens_per_second": tokens / (fwdbwd + optim),
            "ms_per_step": 1000 * (fwdbwd + optim) / steps, "steps": steps, "params_M": model.num_params() / 1e6,
            "compiled": train.COMPILE}


def main(argv=None):
    import argparse
    import json
    parser = argparse.ArgumentParser(description="CPU training MFU against the measured matmul peak")
    parser.add_argument("--seconds", type=float, default=MEASURE_SECONDS, help="how long to time training steps")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args(argv)
    figures = measure(args.seconds)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
