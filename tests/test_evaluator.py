"""The trusted evaluator (training/evaluator.py) and the hand-over (training/handover.py), on the smoke profile.

Tiny models are built and handed over once, in one subprocess (EXPORTER); the evaluator runs from a copy of the
harness, as the run manager starts it, or, for the cases that only need a verdict, several requests in one
process through the same evaluate() function (DRIVER), to keep the suite short."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "training"
HARNESS = ("prepare.py", "runtime.py", "handover.py", "evaluator.py")
TIMEOUT = 600

# Builds every model of these tests, hands each over (or records why it cannot be), and scores the honest one
# with prepare.evaluate_bpb in process: argv = out dir. Prints one JSON object.
EXPORTER = r'''
import json, math, os, sys, time
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
out = Path(sys.argv[1])
import prepare, handover
V, T = prepare.VOCAB_SIZE, prepare.MAX_SEQ_LEN

class Tiny(nn.Module):
    """Honest and causal: token embedding, causal attention, a causal running mean, a linear head."""
    def __init__(self, C=32):
        super().__init__()
        self.emb, self.qkv = nn.Embedding(V, C), nn.Linear(C, 3 * C)
        self.mix, self.head = nn.Linear(3 * C, C), nn.Linear(C, V)
    def forward(self, idx):
        e = self.emb(idx)
        q, k, v = self.qkv(e).unsqueeze(1).chunk(3, dim=-1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        mean = e.cumsum(1) / torch.arange(1, idx.size(1) + 1, device=idx.device)[None, :, None]
        return self.head(torch.tanh(self.mix(torch.cat([e, att, mean], -1)))) * 3

def next_token(idx, scale, positions=None):
    """scale at the logit of the next token: a leak of the future."""
    nxt = torch.cat([idx[:, 1:], idx[:, -1:]], 1)
    leak = (torch.arange(V, device=idx.device) == nxt[..., None]).float() * scale
    if positions is not None:
        leak = leak * positions[None, :, None]
    return leak

class LeakLate(Tiny):          # the future leaks into the last quarter of positions only
    def forward(self, idx):
        late = (torch.arange(T) >= 3 * T // 4).float()
        return super().forward(idx) + next_token(idx, 4.0, late)

class LeakAfterFirstCall(Tiny):  # honest on its first call (the one a probe used to see), leaks after
    calls = 0
    def forward(self, idx):
        self.calls += 1
        return super().forward(idx) + (next_token(idx, 4.0) if self.calls > 1 else 0)

class LeakAfterFirstCallBuffer(Tiny):  # the same, counting in a buffer: the graph would change state
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
    def forward(self, idx):
        self.calls += 1
        return super().forward(idx) + next_token(idx, 4.0) * (self.calls > 1)

class InPlaceHonest(Tiny):    # in-place ops on its own intermediates only: honest, and handed over
    def forward(self, idx):
        logits = super().forward(idx)
        logits += 1.0
        return logits.mul_(1.0)

class ConstantAdded(Tiny):     # a constant per row that depends on the future: no probability changes
    def forward(self, idx):
        return super().forward(idx) + 3.0 * (idx[:, -1:] % 7).float()[..., None]

class NanOnSomeCall(Tiny):     # NaN logits whenever the batch's first row ends in an odd token
    def forward(self, idx):
        bad = (idx[0, -1] % 2 == 1).float()
        return super().forward(idx) + bad / (1 - bad) * 0

class SmallLeakLargeLogits(Tiny):  # huge logits at position 0 inflate a global scale; a small leak everywhere
    def forward(self, idx):
        huge = (torch.arange(T) == 0).float()[None, :, None] * 1e4
        return super().forward(idx) + huge + next_token(idx, 0.5)

class ReadsOtherRows(Tiny):   # each row's predictions read the row before it in the batch: never its own future
    def forward(self, idx):
        other = torch.roll(idx, 1, dims=0)
        return super().forward(idx) + (torch.arange(V, device=idx.device) == other[..., None]).float() * 4.0

class SortOp(Tiny):            # calls an op outside the allow-list
    def forward(self, idx):
        logits = super().forward(idx)
        return logits + 0 * torch.sort(logits, dim=-1).values

class DataDependent(Tiny):     # cannot be exported: a Python branch on a tensor's value
    def forward(self, idx):
        if idx.sum().item() > 0:
            return super().forward(idx)
        return super().forward(idx) * 2

def build(cls):
    torch.manual_seed(0)
    return cls().eval()

report = {}
honest = build(Tiny)
tokenizer = prepare.Tokenizer.load()
report["in_process_bpb"] = prepare.evaluate_bpb(honest, tokenizer, 8)
shape = (6, T)  # 128 rows in batches of 6: the last batch is padded
for cls in (Tiny, InPlaceHonest, LeakLate, LeakAfterFirstCall, ConstantAdded, NanOnSomeCall, SmallLeakLargeLogits,
            ReadsOtherRows):
    handover.export_model(build(cls), out / f"{cls.__name__}.graph", shape, V)
for cls in (LeakAfterFirstCallBuffer, SortOp, DataDependent):
    try:
        handover.export_model(build(cls), out / f"{cls.__name__}.graph", shape, V)
        report[cls.__name__] = "exported"
    except handover.HandoverError as e:
        report[cls.__name__] = str(e)
for cls in (LeakAfterFirstCallBuffer, SortOp):  # written without the trainer-side check: the evaluator's turn
    handover.write_program(handover.export_program(build(cls), shape, V), out / f"{cls.__name__}.graph", check=False)
print(json.dumps(report))
'''

# Runs several requests (JSON list in argv[2]) through one evaluator process: argv[1] = harness dir.
DRIVER = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import evaluator
requests = json.loads(sys.argv[2])
evaluator.harness_env(requests[0]["profile"], requests[0]["dataset"], requests[0]["cache"])
evaluator.isolate(requests[0]["pins"]["harness"])
results = []
for request in requests:
    try:
        results.append(evaluator.evaluate(request))
    except evaluator.EvalError as e:
        results.append({"ok": False, "error": str(e)})
print(json.dumps(results))
'''


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def smoke_env(cache):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTORESEARCH_", "PYTHON"))}
    return {**env, "AUTORESEARCH_PROFILE": "smoke", "AUTORESEARCH_DATASET": "sotu", "AUTORESEARCH_CACHE": str(cache)}


def run_json(cmd, env=None, stdin=None):
    proc = subprocess.run(cmd, env=env, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(lines[-1])


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A copy of the harness, as installed: the evaluator runs from here, so tests may tamper with it."""
    folder = tmp_path_factory.mktemp("harness")
    for name in HARNESS:
        shutil.copy2(TRAINING / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def cache(prepared_cache, tmp_path_factory):
    """A copy of the prepared smoke cache (tests tamper with copies of it, never with this one)."""
    folder = tmp_path_factory.mktemp("eval-cache")
    shutil.copytree(prepared_cache / "sotu", folder / "sotu", ignore=shutil.ignore_patterns("*.lock", "raw"))
    return folder


@pytest.fixture(scope="module")
def pins(harness, cache):
    proc, answer = run_json([sys.executable, "-I", str(harness / "evaluator.py"), "--pins", "--profile", "smoke",
                             "--dataset", "sotu", "--cache", str(cache)])
    assert proc.returncode == 0, proc.stderr
    return answer


@pytest.fixture(scope="module")
def models(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    proc = subprocess.run([sys.executable, "-c", EXPORTER, str(out)], cwd=TRAINING, env=smoke_env(cache),
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return out, report


def request(models, name, cache, pins, **more):
    return {"graph": str(models[0] / f"{name}.graph"), "profile": "smoke", "dataset": "sotu", "cache": str(cache),
            "pins": pins, **more}


def evaluate_cli(harness, req):
    """The evaluator as the run manager starts it: python -I -B, the request on stdin, the result on stdout."""
    return run_json([sys.executable, "-I", "-B", str(harness / "evaluator.py")], env=smoke_env("/nonexistent"),
                    stdin=json.dumps(req))


@pytest.fixture(scope="module")
def verdicts(harness, cache, pins, models, tmp_path_factory):
    """One evaluator process judging the graph-policy cases, plus tampered copies of the data."""
    names = ["InPlaceHonest", "LeakLate", "LeakAfterFirstCall", "ConstantAdded", "NanOnSomeCall", "SmallLeakLargeLogits",
             "LeakAfterFirstCallBuffer", "SortOp", "ReadsOtherRows"]
    reqs = [request(models, name, cache, pins) for name in names]
    for victim, tamper in (("token_bytes.npy", "tokenizer_v8192/token_bytes.npy"), ("val.bin", "tokens_v8192/val.bin")):
        bad = tmp_path_factory.mktemp(f"tampered-{victim}")
        shutil.copytree(cache / "sotu", bad / "sotu")
        path = bad / "sotu" / tamper
        if victim == "token_bytes.npy":  # every token's byte count doubled: a lower bpb for the same model
            import numpy as np
            np.save(path, np.load(path) * 2)
        else:  # one token changed
            data = bytearray(path.read_bytes())
            data[100] ^= 1
            path.write_bytes(bytes(data))
        names.append(f"tampered {victim}")
        reqs.append(request(models, "Tiny", bad, pins))
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", DRIVER, str(harness), json.dumps(reqs)],
                          env=smoke_env("/nonexistent"), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(zip(names, json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.fixture(scope="module")
def honest(harness, cache, pins, models):
    proc, answer = evaluate_cli(harness, request(models, "Tiny", cache, pins))
    assert proc.returncode == 0 and answer["ok"], answer
    return proc, answer


def test_honest_model_scores_what_evaluate_bpb_scores_in_process(honest, models):
    proc, answer = honest
    assert answer["val_bpb"] == pytest.approx(models[1]["in_process_bpb"], abs=1e-5)
    assert answer["rows_evaluated"] == 128 and answer["batch_rows"] == 6  # 22 batches, the last one padded
    assert answer["tokens_evaluated"] > 0 and answer["bytes_evaluated"] > answer["tokens_evaluated"]
    assert answer["probe_rows"] >= 127 and answer["probe_max_diff"] == 0.0
    assert answer["compiled"] is False and answer["precision"] == "float32"  # a small evaluation stays eager
    assert answer["peak_memory_mb"] > 0 and answer["eval_seconds"] >= 0
    # for the trusted MFU: the graph's forward FLOPs per token (Tiny: its three linear layers, causal attention) and
    # the device's peak as the harness measures it
    C = 32
    assert answer["forward_flops_per_token"] == 2 * (C * 3 * C + 3 * C * C + C * 8192) + 4 * C * 128
    assert answer["peak_flops"] > 0 and answer["peak_flops_dtype"] in ("bf16", "fp32")
    assert "phase: evaluating" in proc.stderr and "eval: 128/128 rows" in proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # the pipe carries the result and nothing else


def test_the_graph_runs_under_the_autocast_the_evaluator_uses_on_cuda(harness, cache, pins, models, honest):
    """bf16 autocast changes dtypes inside the graph: export's recorded dtype checks must not refuse it."""
    proc, answer = evaluate_cli(harness, request(models, "Tiny", cache, pins, autocast="bfloat16"))
    assert answer["ok"], answer
    assert answer["precision"] == "bfloat16" and answer["probe_max_diff"] <= 2e-2
    assert answer["val_bpb"] == pytest.approx(honest[1]["val_bpb"], abs=0.02)


def test_a_compiled_evaluation_scores_the_same_and_still_probes(harness, cache, pins, models, honest, tmp_path):
    """What the cpu profile's large evaluation does on a CPU (forced here on the smoke one): the graph compiled, in
    bf16 where the CPU computes it natively; the same score within that precision's tolerance, a leak still
    refused, and the compiled kernels kept in the request's compile_cache only."""
    kernels = tmp_path / "kernels"
    reqs = [request(models, name, cache, pins, compile=True, compile_cache=str(kernels))
            for name in ("Tiny", "LeakLate", "SmallLeakLargeLogits", "Tiny")]
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", DRIVER, str(harness), json.dumps(reqs)],
                          env=smoke_env("/nonexistent"), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored, leak, small_leak, again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["ok"] and scored["compiled"] is True, scored
    assert scored["precision"] in ("bfloat16", "float32")
    close = 0.02 if scored["precision"] == "bfloat16" else 1e-4
    assert scored["val_bpb"] == pytest.approx(honest[1]["val_bpb"], abs=close)
    assert scored["probe_max_diff"] <= (2e-2 if scored["precision"] == "bfloat16" else 1e-3)
    assert not leak["ok"] and "not causal" in leak["error"]
    assert not small_leak["ok"] and "not causal" in small_leak["error"]
    assert again["val_bpb"] == scored["val_bpb"]  # from the kept kernels: the very same number
    assert any(path.is_file() for path in kernels.rglob("*"))


@pytest.mark.parametrize("name", ["LeakLate", "LeakAfterFirstCall", "SmallLeakLargeLogits"])
def test_causality_bypasses_are_caught(verdicts, name):
    assert not verdicts[name]["ok"]
    assert "not causal" in verdicts[name]["error"]


def test_a_model_reading_other_rows_of_its_batch_is_refused(verdicts):
    """A row's predictions may depend on its own earlier tokens only: probes run in batches of other rows."""
    assert not verdicts["ReadsOtherRows"]["ok"]
    assert "not causal" in verdicts["ReadsOtherRows"]["error"] and "other rows" in verdicts["ReadsOtherRows"]["error"]


def test_nan_logits_fail(verdicts):
    assert not verdicts["NanOnSomeCall"]["ok"]
    assert "non-finite" in verdicts["NanOnSomeCall"]["error"]


def test_in_place_ops_on_intermediates_are_fine(verdicts, honest):
    answer = verdicts["InPlaceHonest"]
    assert answer["ok"], answer
    assert answer["val_bpb"] == pytest.approx(honest[1]["val_bpb"], abs=1e-5)


def test_a_constant_added_to_the_logits_changes_nothing(verdicts, honest):
    answer = verdicts["ConstantAdded"]
    assert answer["ok"], answer
    assert answer["val_bpb"] == pytest.approx(honest[1]["val_bpb"], abs=1e-5)


def test_graphs_that_change_state_are_refused(verdicts, models):
    message = models[1]["LeakAfterFirstCallBuffer"]  # the trainer is told first
    assert message.startswith("cannot hand the model to the evaluator: forward writes to calls") and "\n" not in message
    answer = verdicts["LeakAfterFirstCallBuffer"]
    assert not answer["ok"] and "it changes state" in answer["error"]


def test_ops_outside_the_allow_list_are_refused(verdicts, models):
    assert "aten.sort" in models[1]["SortOp"]
    answer = verdicts["SortOp"]
    assert not answer["ok"] and "torch.ops.aten.sort" in answer["error"] and "allow-list" in answer["error"]


def test_a_model_that_cannot_be_exported_gets_one_line_saying_why(models):
    message = models[1]["DataDependent"]
    assert message.startswith("cannot hand the model to the evaluator: torch.export failed")
    assert "\n" not in message and "no Python branches on tensor values" in message


@pytest.mark.parametrize("victim", ["token_bytes.npy", "val.bin"])
def test_tampered_data_is_refused(verdicts, victim):
    answer = verdicts[f"tampered {victim}"]
    assert not answer["ok"] and f"{victim} does not match its pin" in answer["error"]


def test_an_edited_prepare_is_refused(harness, cache, pins, models, tmp_path):
    edited = tmp_path / "harness"
    shutil.copytree(harness, edited)
    source = (edited / "prepare.py").read_text()
    (edited / "prepare.py").write_text(source.replace("return min(eval_tokens, n_val_tokens) // max_seq_len",
                                                      "return 1"))
    proc, answer = evaluate_cli(edited, request(models, "Tiny", cache, pins))
    assert proc.returncode == 1 and not answer["ok"]
    assert "prepare.py does not match its pin" in answer["error"]


def plant_pyc(source, evil):
    """Compiles evil in place of source's code into source's __pycache__, stamped with source's mtime and size,
    so that an ordinary import would run it."""
    stat = source.stat()
    code = compile(evil, str(source), "exec")
    pyc = Path(importlib.util.cache_from_source(str(source)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(importlib._bootstrap_external._code_to_timestamp_pyc(code, int(stat.st_mtime), stat.st_size))


def test_planted_bytecode_is_never_run(harness, cache, pins, models, tmp_path):
    """.pyc files beside prepare.py (leaving a marker when it runs) and handover.py (letting every op through):
    the evaluator runs the pinned source bytes, so no marker appears and the graph calling aten.sort is refused."""
    planted, marker = tmp_path / "harness", tmp_path / "planted-prepare-ran"
    shutil.copytree(harness, planted)
    plant_pyc(planted / "prepare.py", f"open({str(marker)!r}, 'w').close()\n" + (planted / "prepare.py").read_text())
    plant_pyc(planted / "handover.py", (planted / "handover.py").read_text()
              + "\ndef op_allowed(target, extra_ops=()):\n    return True\nPLANTED = True\n")
    control = subprocess.run([sys.executable, "-c", "import handover; print(getattr(handover, 'PLANTED', False))"],
                             cwd=planted, capture_output=True, text=True, timeout=TIMEOUT)
    assert control.stdout.strip() == "True"  # the plant works on an ordinary import
    proc, answer = evaluate_cli(planted, request(models, "SortOp", cache, pins))
    assert not answer["ok"] and "torch.ops.aten.sort" in answer["error"]
    assert not marker.exists()


def test_a_request_without_pins_is_refused(harness):
    proc, answer = run_json([sys.executable, "-I", "-B", str(harness / "evaluator.py")],
                            stdin=json.dumps({"graph": "x", "profile": "smoke", "dataset": "sotu", "pins": {}}))
    assert proc.returncode == 2 and not answer["ok"] and "pins" in answer["error"]


# train.py's default GPT for a profile, handed over and read back: the graph computes what the model computes.
DEFAULT_MODEL = r'''
import json, sys, torch
import prepare, train, handover, runtime, evaluator
runtime.use_attention_backend(sys.argv[3])  # flex: the graph must hold SDPA (flex's BlockMask does not serialize)
config = train.build_config(train.DEPTH, prepare.VOCAB_SIZE, prepare.MAX_SEQ_LEN)
torch.manual_seed(0)
model = train.GPT(config)
model.init_weights(dtype=getattr(torch, sys.argv[2]))  # bfloat16: embeddings as train.py keeps them on CUDA
with torch.no_grad():  # init leaves the blocks as identities: give them weights so attention matters
    for block in model.transformer.h:
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
shape = handover.eval_batch_shape(prepare.PROFILE.name, prepare.MAX_SEQ_LEN)
handover.export_model(model, sys.argv[1], shape, prepare.VOCAB_SIZE)
runtime.build_attention_masks(prepare.MAX_SEQ_LEN, model.windows, "cpu")
program = handover.load_program(sys.argv[1])
graph = program.module()
x = torch.randint(0, prepare.VOCAB_SIZE, shape)
counted = evaluator.forward_flops(program, graph, *shape, torch.device("cpu")) / (shape[0] * shape[1])
with torch.no_grad():
    print(json.dumps({"max_diff": (graph(x) - model(x)).abs().max().item(), "shape": list(shape),
                      "backend": runtime.attention_backend(), "training_flops_counted": 3 * counted,
                      "training_flops_estimated": model.estimate_flops()}))
'''


@pytest.mark.parametrize("profile", ["smoke"])  # cpu and gpu sizes: bench/evaluator.py
@pytest.mark.parametrize("dtype,backend", [("float32", "sdpa"), ("bfloat16", "sdpa"), ("float32", "flex")])
def test_train_py_default_model_hands_over(cache, profile, dtype, backend, tmp_path):
    env = {**smoke_env(cache), "AUTORESEARCH_PROFILE": profile}
    proc = subprocess.run([sys.executable, "-c", DEFAULT_MODEL, str(tmp_path / "model.graph"), dtype, backend],
                          cwd=TRAINING,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["max_diff"] <= (1e-4 if backend == "flex" else 0.0)  # flex vs SDPA kernels: rounding only
    assert answer["backend"] == backend  # the hand-over gives the training backend back
    # the trusted MFU's numerator, counted in the graph (its matmuls, attention over each layer's window), is
    # train.py's own estimate of its training FLOPs per token (which counts a window of w as w keys, not w + 1)
    assert answer["training_flops_counted"] == pytest.approx(answer["training_flops_estimated"], rel=1e-3)


PEAK_DRIVER = r'''
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch, evaluator, runtime
measure, calls = runtime.measure_matmul_flops, []
def counted(*args, **kwargs):
    calls.append(1)
    return measure(*args, **{**kwargs, "seconds": 0.05})
runtime.measure_matmul_flops = counted
cpu, cache = torch.device("cpu"), Path(sys.argv[2])
runtime.choose_precision("cpu")
made = []
for _ in range(evaluator.PEAK_MEASUREMENTS + 1):
    before = len(calls)
    made.append((evaluator.device_peak(cpu, cache)[0], len(calls) - before))
before = len(calls)
evaluator.device_peak(cpu, None)
print(json.dumps({"made": made, "uncached": len(calls) - before,
                  "kept": json.loads((cache / evaluator.PEAK_FILE).read_text())}))
'''


def test_the_device_peak_is_measured_a_few_times_then_the_best_is_reused(harness, tmp_path):
    """The MFU's denominator: measured by the first runs of a workspace (a shared machine can halve one measurement),
    then the best of them is read from the evaluator's own cache instead of measuring for ~1.6 s every run."""
    proc = subprocess.run([sys.executable, "-I", "-B", "-c", PEAK_DRIVER, str(harness), str(tmp_path / "kernels")],
                          env=smoke_env("/nonexistent"), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    *measured, (reused, measurements) = report["made"]
    assert all(n == 1 for _, n in measured) and measurements == 0
    assert reused == max(peak for peak, _ in measured) > 0
    (entry,) = report["kept"].values()
    assert entry["measured"] == len(measured) and entry["peak_flops"] == reused
    assert report["uncached"] == 1  # without a cache (an unsandboxed trainer could write one) it measures each time


def test_pins_record_once_whether_inductors_isa_check_can_be_skipped(harness, cache, tmp_path):
    """At a session's start (--pins --isa-record): inductor's own check runs once, and the record says whether the
    choice without it is the same; later runs read it instead of checking again (~1.1 s a process)."""
    folder = tmp_path / "evaluator-compile"
    cmd = [sys.executable, "-I", str(harness / "evaluator.py"), "--pins", "--profile", "smoke", "--dataset", "sotu",
           "--cache", str(cache), "--isa-record", str(folder)]
    proc, answer = run_json(cmd)
    assert proc.returncode == 0 and "harness" in answer, proc.stderr[-2000:]
    record = json.loads((folder / "vec-isa.json").read_text())
    assert set(record) == {"host", "torch", "skip_check", "isa"} and isinstance(record["skip_check"], bool)
    proc, again = run_json(cmd)
    assert again == answer and json.loads((folder / "vec-isa.json").read_text()) == record
