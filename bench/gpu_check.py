"""
The GPU acceptance check: what the harness does on a real CUDA card, in one short script (a few minutes).

Stages, each in its own process with its own time limit, each one's output kept in OUT_DIR/<stage>.log:
  info       the card, torch, what runtime.py chose (precision, attention backend, peak FLOP/s from its table)
             and a measured bf16 matmul rate to set the table's figure against;
  inprocess  train.py on the gpu profile, as a human runs it (evaluated in process): compile time, MFU,
             tokens/s, peak memory, val_bpb;
  pipeline   the trusted path: the feeder (owns the clock), train.py handing its model over (torch.export on
             CUDA), then the trusted evaluator on the card, in bf16 and in fp32;
  trusted    the server's own pipeline (server/pipeline.py) end to end, sandboxed where bubblewrap works;
  sandbox    bubblewrap around a CUDA program, the GPU's device nodes bound in as the trainer gets them;
  pool       what `serve --devices auto` finds.
A summary of figures is printed at the end and written to OUT_DIR/summary.json. Needs a prepared cache
(AUTORESEARCH_CACHE) and torch with CUDA; never the server's MCP packages.
Usage: python bench/gpu_check.py [--budget 60] [--pipeline-budget 45] [--out DIR]
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "training"
INFO = r"""
import json, torch, runtime
name = torch.cuda.get_device_name(0)
p = runtime.choose_precision()
out = {"gpu": name, "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(runtime.DEVICE),
       "precision": p.name, "attention": runtime.attention_backend(), "table_peak_tflops": round(p.peak_flops / 1e12, 1),
       "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
out["measured_bf16_tflops"] = round(runtime.measure_matmul_flops(torch.bfloat16, "cuda", size=8192, seconds=2.0) / 1e12, 1)
print("INFO " + json.dumps(out))
"""


def stage(name, argv, env, out_dir, timeout, **kw):
    """Runs argv, its output to OUT_DIR/name.log; returns (returncode or 'timeout', seconds, output)."""
    t0 = time.time()
    log = out_dir / f"{name}.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, **kw).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    seconds = round(time.time() - t0, 1)
    text = log.read_text(errors="replace")
    print(f"[{name}] rc={rc} in {seconds}s", flush=True)
    if rc != 0:
        print("\n".join(text.splitlines()[-25:]), flush=True)
    return rc, seconds, text


def summary_block(text):
    """The `---` block train.py prints at the end, as {key: number or text}."""
    found = {}
    for line in text.split("\n---\n")[-1].splitlines():
        m = re.match(r"^(\w+):\s+(\S+)$", line)
        if m:
            try:
                found[m.group(1)] = float(m.group(2))
            except ValueError:
                found[m.group(1)] = m.group(2)
    return found


def first_line_time(text, pattern):
    return next((line for line in text.splitlines() if re.search(pattern, line)), None)


def run_pipeline_by_hand(env, work, out_dir, timeout):
    """feeder + trainer with the handover, as the server's pipeline runs them (no sandbox here)."""
    a, b = socket.socketpair()
    status = work / "feeder.json"
    t0 = time.time()
    feeder = subprocess.Popen([sys.executable, "-I", str(HARNESS / "feeder.py"), "--fd", str(a.fileno()),
                               "--status", str(status)], pass_fds=(a.fileno(),), env=env,
                              stdout=open(out_dir / "feeder.log", "w"), stderr=subprocess.STDOUT)
    a.close()
    tenv = dict(env, AUTORESEARCH_FEEDER_FD=str(b.fileno()), AUTORESEARCH_HANDOVER=str(work / "model.graph"))
    rc, seconds, text = stage("pipeline_train", [sys.executable, str(work / "train.py")], tenv, out_dir, timeout,
                              pass_fds=(b.fileno(),), cwd=work)
    b.close()
    try:
        feeder.wait(30)
    except subprocess.TimeoutExpired:
        feeder.kill()
    figures = json.loads(status.read_text()) if status.exists() else {}
    return rc, seconds, text, figures


def evaluate(env, graph, pins, out_dir, name, autocast, timeout):
    request = {"graph": str(graph), "profile": env["AUTORESEARCH_PROFILE"], "dataset": env["AUTORESEARCH_DATASET"],
               "cache": env.get("AUTORESEARCH_CACHE"), "pins": pins, "autocast": autocast}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-I", "-B", str(HARNESS / "evaluator.py")], input=json.dumps(request),
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[{name}] timeout", flush=True)
        return {"ok": False, "error": "timeout"}
    (out_dir / f"{name}.log").write_text(proc.stderr + "\n" + proc.stdout)
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        result = {"ok": False, "error": proc.stderr[-2000:]}
    result["wall_seconds"] = round(time.time() - t0, 1)
    print(f"[{name}] {json.dumps(result)[:600]}", flush=True)
    return result


def trusted_run(work, profile, dataset, budget):
    """The server's own pipeline (server/pipeline.py), sandboxed where bubblewrap works, as a run gets it."""
    sys.path.insert(0, str(ROOT))
    from server import pipeline
    cache = Path(os.environ["AUTORESEARCH_CACHE"])
    run_dir, state = work / "state" / "runs" / "gpu-check", work / "state"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.py").write_text((HARNESS / "train.py").read_text())
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")}
    env.update(AUTORESEARCH_PROFILE=profile, AUTORESEARCH_DATASET=dataset, AUTORESEARCH_CACHE=str(cache),
               AUTORESEARCH_TIME_BUDGET=f"{budget:g}", AUTORESEARCH_SEED="42", PYTHONUNBUFFERED="1",
               PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(HARNESS))
    pins = json.loads(subprocess.run([sys.executable, "-I", str(HARNESS / "evaluator.py"), "--pins", "--profile",
                                      profile, "--dataset", dataset, "--cache", str(cache)], env=env,
                                     capture_output=True, text=True, timeout=120).stdout.strip().splitlines()[-1])
    data = cache / dataset
    spec = {"run_id": "gpu-check", "run_dir": str(run_dir), "state_dir": str(state), "harness_dir": str(HARNESS),
            "python": sys.executable, "env": env, "isolation": "auto", "profile": profile, "dataset": dataset,
            "cache": str(cache), "device": "cuda", "evaluator_pins": pins,
            "readable": [str(HARNESS), str(data / "tokenizer_v8192"), str(data / "tokens_v8192" / "READY")],
            "hidden": [], "compile_cache": str(work / "compile-cache"), "feeder_status": str(state / "feeder.json")}
    t0 = time.time()
    result = pipeline.run_pipeline(spec)
    result["wall_seconds"] = round(time.time() - t0, 1)
    print("TRUSTED " + json.dumps(result, default=str), flush=True)
    graph = run_dir / "model.graph"
    if graph.exists():  # the same graph scored again without autocast: how much the evaluator's bf16 moves it
        again = evaluate(env, graph, pins, work, "evaluator_fp32", None, 240)
        print("FP32 " + json.dumps({k: again.get(k) for k in ("ok", "val_bpb", "eval_seconds", "error")}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--budget", type=float, default=60.0, help="training seconds of the in-process run")
    parser.add_argument("--pipeline-budget", type=float, default=45.0, help="training seconds of the pipeline run")
    parser.add_argument("--dataset", default="sotu")
    parser.add_argument("--profile", default="gpu", help="another profile only to try this script on a CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"))
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    parser.add_argument("--trusted-stage", help=argparse.SUPPRESS)  # re-entry: one stage in its own process
    args = parser.parse_args()
    if args.trusted_stage:
        return trusted_run(Path(args.trusted_stage), args.profile, args.dataset, args.pipeline_budget)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    env = dict(os.environ, PYTHONPATH=str(HARNESS), PYTHONUNBUFFERED="1", AUTORESEARCH_PROFILE=args.profile,
               AUTORESEARCH_DATASET=args.dataset)
    summary = {}

    if "info" not in skip:
        rc, seconds, text = stage("info", [sys.executable, "-c", INFO], env, out_dir, 120)
        line = first_line_time(text, r"^INFO ")
        summary["info"] = json.loads(line[5:]) if line else {"rc": rc}

    if "sandbox" not in skip:
        # bubblewrap around a CUDA program, with the GPU device nodes bound in as the trainer gets them
        code = ("import sys, json; sys.path.insert(0, %r); from server import sandbox; from pathlib import Path; "
                "import subprocess, tempfile; ok, why = sandbox.probe(); print('PROBE', ok, why, flush=True); "
                "run = Path(tempfile.mkdtemp()); state = Path(tempfile.mkdtemp()); "
                "cmd = [sys.executable, '-c', 'import torch; x = torch.ones(4096, 4096, device=\"cuda\"); "
                "print(\"INSIDE\", torch.cuda.get_device_name(0), float((x @ x)[0, 0]))']; "
                "launch = sandbox.build_command(cmd, isolation='sandbox', run_dir=run, state_dir=state, "
                "readable=[Path(%r)]); print('ISOLATION', launch.isolation, launch.reason, flush=True); "
                "print('GPU_NODES', sandbox.gpu_devices(), flush=True); "
                "p = sandbox.spawn(launch.argv, cwd=run); print('RC', p.wait())") % (str(ROOT), str(HARNESS))
        rc, seconds, text = stage("sandbox", [sys.executable, "-c", code], env, out_dir, 120)
        summary["sandbox"] = [l for l in text.splitlines() if l.startswith(("PROBE", "ISOLATION", "GPU_NODES", "INSIDE", "RC"))] or f"rc={rc}"

    if "inprocess" not in skip:
        work = out_dir / "inprocess_run"
        work.mkdir(exist_ok=True)
        (work / "train.py").write_text((HARNESS / "train.py").read_text())
        t_env = dict(env, AUTORESEARCH_TIME_BUDGET=f"{args.budget:g}")
        rc, seconds, text = stage("inprocess", [sys.executable, "train.py"], t_env, out_dir,
                                  args.budget + 300, cwd=work)
        summary["inprocess"] = {"rc": rc, "wall_seconds": seconds, "budget": args.budget, **summary_block(text),
                                "header": [l for l in text.splitlines() if l.startswith(("precision:", "parameters:", "batch:"))]}

    if "pipeline" not in skip:
        work = out_dir / "pipeline_run"
        work.mkdir(exist_ok=True)
        (work / "train.py").write_text((HARNESS / "train.py").read_text())
        t_env = dict(env, AUTORESEARCH_TIME_BUDGET=f"{args.pipeline_budget:g}")
        rc, seconds, text, feeder = run_pipeline_by_hand(t_env, work, out_dir, args.pipeline_budget + 240)
        export = first_line_time(text, r"^handover: ")
        summary["pipeline"] = {"rc": rc, "wall_seconds": seconds, "feeder": feeder, "handover": export,
                               "trainer": summary_block(text)}
        pins_proc = subprocess.run([sys.executable, "-I", str(HARNESS / "evaluator.py"), "--pins", "--profile", args.profile,
                                    "--dataset", args.dataset] + (["--cache", env["AUTORESEARCH_CACHE"]]
                                                                  if env.get("AUTORESEARCH_CACHE") else []),
                                   capture_output=True, text=True, env=t_env, timeout=120)
        pins = json.loads(pins_proc.stdout.strip().splitlines()[-1]) if pins_proc.stdout.strip() else {}
        if (work / "model.graph").exists():
            summary["pipeline"]["graph_mib"] = round((work / "model.graph").stat().st_size / 2**20, 1)
            summary["evaluator_bf16"] = evaluate(t_env, work / "model.graph", pins, out_dir, "evaluator_bf16",
                                                 "bfloat16", 240)
            summary["evaluator_fp32"] = evaluate(t_env, work / "model.graph", pins, out_dir, "evaluator_fp32",
                                                 None, 240)

    if "trusted" not in skip:
        work = (out_dir / "trusted_run").resolve()
        rc, seconds, text = stage("trusted", [sys.executable, __file__, "--trusted-stage", str(work), "--profile",
                                              args.profile, "--dataset", args.dataset, "--pipeline-budget",
                                              f"{args.pipeline_budget:g}"], env, out_dir, args.pipeline_budget + 300)
        line = first_line_time(text, r"^TRUSTED ")
        summary["trusted"] = json.loads(line[8:]) if line else {"rc": rc}
        line = first_line_time(text, r"^FP32 ")
        summary["trusted_fp32"] = json.loads(line[5:]) if line else None
        summary["trusted_log"] = [l for l in text.splitlines() if not l.startswith(("step ", "eval: "))][-40:]

    if "pool" not in skip:
        code = "from server import pool; print('POOL', pool.parse_devices('auto') if hasattr(pool, 'parse_devices') else dir(pool))"
        rc, seconds, text = stage("pool", [sys.executable, "-c", code], dict(env, PYTHONPATH=str(ROOT)), out_dir, 60)
        summary["pool"] = first_line_time(text, r"^POOL ") or f"rc={rc}"

    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("SUMMARY " + json.dumps(summary, indent=2, default=str), flush=True)


if __name__ == "__main__":
    main()
