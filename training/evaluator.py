"""
The trusted evaluator: scores a model handed over by train.py (training/handover.py) in a fresh process that
runs harness code only. The run manager starts it after the trainer and all its descendants are gone:

    python -I -B <harness>/evaluator.py < request.json     (request: one JSON object, see Request below)

and reads the result from its stdout: one JSON line, {"ok": true, "val_bpb": ..., ...} (exit 0) or
{"ok": false, "error": "<one line>"} (exit 1; exit 2 for a malformed request). Progress lines in the run log's
protocol (`phase: evaluating`, `eval: <done>/<total> rows`) go to stderr.

What it trusts: this file, and the harness modules beside it (prepare.py, runtime.py, handover.py), which it runs
from their source bytes only after checking them against the pins it is given: no bytecode is read for them
(a planted __pycache__ is never used), and nothing from the workspace is on sys.path. The data (tokenizer,
token_bytes, the val split) is copied into a private folder while its sha256 is checked, then read from there.
What it does not trust: the handed-over file. Its graph must pass handover.check_program (pure tensor ops from an
allow-list, no state changes, static shapes, nothing run on load); the evaluator computes the cross-entropy from
the logits itself in fp32, fails on non-finite logits, and checks causality on probe batches the graph cannot
tell apart from scored ones. For the run's MFU it also counts the graph's FLOPs per token (from shapes alone) and
gives the device's peak as the harness measures or looks it up.

    python -I <harness>/evaluator.py --pins --profile P --dataset D [--cache C]
prints the pins of the harness beside this file and of a prepared dataset, for the server to record once.
"""

import argparse
import hashlib
import importlib.abc
import importlib.util
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

T_START = time.time()
HARNESS_DIR = Path(__file__).resolve().parent
HARNESS_FILES = ("prepare.py", "runtime.py", "handover.py")  # imported by name, each checked against its pin
# The prepared files that decide the score, by folder (prepare.tokenizer_dir / prepare.tokens_dir).
DATA_FILES = {"tokenizer.pkl": "tokenizer", "token_bytes.npy": "tokenizer", "val.bin": "tokens", "val.idx.npy": "tokens"}

# Causality probes: scored rows again, their tokens after a random cut taken from another row, batched with other
# rows than they were scored with; at every position before the cut the probe must give the row's own next token the
# same log-probability as its scoring did. That is the very quantity the score sums: a leak that raises it (the only
# kind that can lower val_bpb) reads a future token, or another row, that the probe has replaced, so the two differ.
# A constant added to a position's logits changes no log-probability, and the tolerance is in nats, the same at
# every position whatever the logits' magnitude. Both sides come out of the one compiled scoring program: no logits
# are kept, and a probe costs one forward pass.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 2e-2, "float16": 1e-2}  # nats; by the precision the graph runs in
# Sampling: a model leaking the next token at a fraction f of (row, position) pairs escapes P probe rows with
# probability (1 - f)^P, whatever the number of rows scored: what buys the guarantee is P itself, not a share.
# P is at least one row per cut position and PROBE_ROWS, but never more than the rows scored (smoke's 128: a
# seconds-long check gets as many probes as rows). The cpu profile probes 256 rows (+50% of its forward passes),
# gpu 2047 (+20%): a leak at 2% of positions is caught 99.4% of the time, at 1% 92% (cpu) and 100% (gpu). What a
# leak buys is about f x the loss it removes: at f = 1%, 0.017 bpb on the cpu profile, near its noise floor (~0.01).
PROBE_ROWS = 256
AUTOCAST_DTYPES = ("bfloat16", "float16")
# On a CPU a large evaluation (the cpu profile's 2^17 tokens and probes: 96 forward passes) is compiled, run under
# bf16 autocast where the CPU computes bf16 natively (AVX512-BF16, AMX): on a 2-core EPYC eager fp32 took 0.38 s a
# batch, compiled bf16 0.14 s, for a one-off compile of ~15 s (~2.5 s from the kept kernels). A small one (smoke's
# 2^14 tokens) stays eager: compiling would cost
# more than it saves. The compile runs in this process (no compile workers), its cache in the private folder or in the
# request's "compile_cache", a folder no trainer can write (the pipeline names one only for sandboxed trainers), so
# nothing a trainer wrote is ever loaded; CUDA stays eager (its evaluation is already ~2% of the budget).
COMPILE_MIN_TOKENS = 2**16
READ_CHUNK = 1 << 22
PEAK_SECONDS = 1.0  # the device peak's measurement for the run's MFU, where there is no datasheet figure
PEAK_MEASUREMENTS = 1  # runs that measure it before the best of theirs is reused (with a compile cache)
PEAK_FILE = "device-peak.json"
# Inductor checks which vector ISA a CPU can run by building a test library per ISA and loading each in a fresh
# Python process: ~1.1 s of every process that compiles for a CPU (the evaluator's, and the trainer's step 0). The
# server's `--pins --isa-record <the evaluator's compile cache>` at a session's start runs that check once and
# records whether skipping it (inductor's vec_isa_ok) picks the same ISA on this host with this torch; the
# evaluator and, through the pipeline, the trainer skip it only then, in every run alike (the setting is part of
# inductor's cache keys).
ISA_FILE = "vec-isa.json"


class EvalError(Exception):
    """The model or the harness state is refused; the message is one line saying why."""


def log(line):
    print(line, file=sys.stderr, flush=True)


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Harness modules: from their pinned source bytes, never from bytecode or the workspace
# ---------------------------------------------------------------------------

class PinnedHarness(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports prepare, runtime and handover from HARNESS_DIR: the bytes are read once, checked against the pin
    and compiled here, so a changed file or a planted .pyc can never run. pins None: trust the files (--pins)."""

    def __init__(self, pins):
        self.pins = pins

    def find_spec(self, name, path=None, target=None):
        if f"{name}.py" not in HARNESS_FILES:
            return None
        return importlib.util.spec_from_loader(name, self, origin=str(HARNESS_DIR / f"{name}.py"))

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        path = HARNESS_DIR / f"{module.__name__}.py"
        source = path.read_bytes()
        if self.pins is not None and sha256_bytes(source) != self.pins.get(path.name):
            raise EvalError(f"the harness file {path} does not match its pin: it was changed since the server "
                            "started; reinstall autoresearch-mcp (or restore the file) and restart the server")
        module.__file__ = str(path)
        exec(compile(source, str(path), "exec", dont_inherit=True), module.__dict__)


def isolate(pins):
    """No bytecode written, nothing of the harness dir or the working directory on sys.path, harness modules
    only through PinnedHarness."""
    sys.dont_write_bytecode = True
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != HARNESS_DIR]
    sys.meta_path.insert(0, PinnedHarness(pins))


def harness_env(profile, dataset, cache):
    """prepare.py resolves its settings from the environment at import: give it exactly these."""
    for key in [k for k in os.environ if k.startswith("AUTORESEARCH_")]:
        del os.environ[key]
    os.environ.update(AUTORESEARCH_PROFILE=profile, AUTORESEARCH_DATASET=dataset)
    if cache:
        os.environ["AUTORESEARCH_CACHE"] = str(cache)


# ---------------------------------------------------------------------------
# Pins
# ---------------------------------------------------------------------------

def data_paths(prepare, cache_dir, dataset, vocab_size):
    data_dir = prepare.get_cache_dir(cache_dir) / prepare.dataset_name(dataset)
    folders = {"tokenizer": prepare.tokenizer_dir(data_dir, vocab_size), "tokens": prepare.tokens_dir(data_dir, vocab_size)}
    return data_dir, {name: folders[folder] / name for name, folder in DATA_FILES.items()}


def compute_pins(profile, dataset, cache):
    """{"harness": {file: sha256}, "data": {file: sha256}} of the harness beside this file and a prepared dataset."""
    harness_env(profile, dataset, cache)
    isolate(None)
    import prepare
    _, paths = data_paths(prepare, prepare.CACHE_DIR, prepare.DATASET_SOURCE, prepare.VOCAB_SIZE)
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise EvalError(f"dataset {dataset} is not prepared ({missing[0]} is missing): run "
                        f"`autoresearch-mcp prepare --dataset {dataset} --profile {profile}`")
    return {"harness": {name: sha256_bytes((HARNESS_DIR / name).read_bytes()) for name in HARNESS_FILES},
            "data": {name: _sha256_file(path) for name, path in paths.items()}}


def _sha256_file(path, copy_to=None):
    h = hashlib.sha256()
    with open(path, "rb") as f, (open(copy_to, "wb") if copy_to else open(os.devnull, "wb")) as out:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()


def private_copy(prepare, request, private):
    """Copies the pinned data files (and meta.json, checked against them by load_split) into a private cache,
    checking each sha256 on the way, and returns the tokenizer loaded from there."""
    V, source = prepare.VOCAB_SIZE, str(request["dataset"])
    data_dir, paths = data_paths(prepare, request.get("cache"), source, V)
    _, copies = data_paths(prepare, private, source, V)
    fix = (f"the prepared data changed after the server recorded it: run `autoresearch-mcp prepare --dataset "
           f"{source} --profile {prepare.PROFILE.name} --force`, then restart the server")
    for name, path in paths.items():
        copies[name].parent.mkdir(parents=True, exist_ok=True)
        try:
            digest = _sha256_file(path, copy_to=copies[name])
        except OSError as e:
            raise EvalError(f"cannot read {path}: {e.strerror}; {fix}") from None
        if digest != request["pins"]["data"][name]:
            raise EvalError(f"{path} does not match its pin (sha256 {digest[:12]}, pinned "
                            f"{request['pins']['data'][name][:12]}): {fix}")
    tokens = prepare.tokens_dir(data_dir, V)
    shutil.copyfile(tokens / "meta.json", copies["val.bin"].parent / "meta.json")
    prepare.ready_marker(prepare.get_cache_dir(private) / prepare.dataset_name(source), V).write_text("{}")
    return prepare.Tokenizer.load(source, private, V)


# ---------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------

def val_rows(prepare, tokenizer, batch, seq_len):
    """(rows scored, int64 array [n_batches * batch, seq_len + 1]): the pinned val rows, in the order
    evaluate_bpb scores them, and the further rows that pad the last batch (computed, never counted)."""
    import numpy as np
    tokens, offsets = prepare.load_split(tokenizer, "val")
    rows = prepare.eval_rows(len(tokens), seq_len, prepare.EVAL_TOKENS)
    if rows == 0:
        raise EvalError(f"the val split ({len(tokens):,} tokens) is shorter than one row of {seq_len} tokens")
    n_batches = -(-rows // batch)
    stream = prepare.packed_batches(tokens, offsets, batch, seq_len, tokenizer.get_bos_token_id(), prepare.VAL_SEED)
    return rows, np.concatenate([next(stream)[0] for _ in range(n_batches)])


def probe_plan(n_batches, batch, seq_len, n_rows, rows_scored, rng):
    """{scored batch index: [[(row, donor row, cut)] per probe batch run after it]}. At least one probe row per cut
    1..seq_len-1 (a leak at any position shows at some cut) and PROBE_ROWS (at most the rows scored). The probe
    batches run among the second half of the scored ones, each on `batch` distinct rows drawn from all those scored
    by then, at positions of their own: a probed row's later tokens are another row's, and the rest of its batch
    is other rows, so a prediction that reads a row's own future or any other row shows. Donors are other rows
    of the val set."""
    n_probe_rows = max(seq_len - 1, min(PROBE_ROWS, rows_scored))
    n_probe = -(-n_probe_rows // batch)
    cuts = []
    while len(cuts) < n_probe * batch:
        cuts += rng.permutation(range(1, seq_len)).tolist()
    plan = {}
    for k, after in enumerate(sorted(rng.integers(n_batches // 2, n_batches, size=n_probe).tolist())):
        entries = []
        for i, row in enumerate(rng.choice((after + 1) * batch, size=batch, replace=False).tolist()):
            donor = int(rng.integers(n_rows - 1))
            donor += donor >= row  # never the row itself
            entries.append((row, donor, cuts[k * batch + i]))
        plan.setdefault(after, []).append(entries)
    return plan


def probe_diff(scored, probed, cuts):
    """Largest |difference| between two batches' per-position cross-entropies (the same targets) at the positions
    before each row's cut."""
    import torch
    cuts = torch.tensor(cuts, device=scored.device)
    before = torch.arange(scored.size(1), device=scored.device)[None, :] < cuts[:, None]
    return torch.where(before, (scored - probed).abs(), 0.0).max().item()


def check_output(ep, B, T, V):
    """The graph returns one floating tensor of logits (B, T, V): read from its static output, before it runs."""
    import torch
    (outputs,) = [n.args[0] for n in ep.graph.nodes if n.op == "output"]
    user = [o for o, spec in zip(outputs, ep.graph_signature.output_specs) if spec.kind.name == "USER_OUTPUT"]
    value = user[0].meta.get("val") if len(user) == 1 and hasattr(user[0], "meta") else None
    if not (torch.is_tensor(value) and value.is_floating_point() and tuple(value.shape) == (B, T, V)):
        got = (f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}" if torch.is_tensor(value)
               else f"{len(user)} outputs" if len(user) != 1 else "something other than a tensor")
        raise EvalError(f"the graph returns {got}, not logits ({B}, {T}, {V}): export the model whose forward(idx) "
                        "returns the logits, with handover.export_model")


ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")


def forward_flops(ep, module, batch, seq_len, device):
    """FLOPs of one forward call of the graph over a (batch, seq_len) batch, from shapes alone (nothing is computed):
    torch's FlopCounterMode on fake tensors counts the matrix multiplies; attention is counted here, per
    scaled_dot_product_attention call, as 4 x batch x heads x queries x head dim x the keys a query may see (the
    widest row of a constant mask; every key when causal, unmasked or masked in-graph): train.py's and upstream's
    convention, so the trusted MFU and train.py's agree on the default model. None where the graph cannot run on
    fake tensors (a custom kernel without a fake implementation): the run then has no MFU, and is scored as ever."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode, FlopCounterMode(display=False) as counter:
            module(mode.from_tensor(torch.zeros(batch, seq_len, dtype=torch.long, device=device)))
    except Exception as e:  # noqa: BLE001 - an uncountable graph costs its MFU figure, never its score
        log(f"MFU: the graph's FLOPs cannot be counted ({type(e).__name__}); the run reports no MFU")
        return None
    flops = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items()
                if not any(a in str(op) for a in ATTENTION_OPS))
    signature = ep.graph_signature
    lifted = {**signature.inputs_to_lifted_tensor_constants, **signature.inputs_to_buffers}
    constants = {**ep.state_dict, **ep.constants}
    for node in ep.graph.nodes:
        if node.op != "call_function" or "scaled_dot_product_attention" not in str(node.target):
            continue
        q, k = (a.meta["val"] for a in node.args[:2])
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        keys = k.shape[-2]
        value = constants.get(lifted.get(getattr(mask, "name", None)))
        if torch.is_tensor(value) and value.dim() >= 2:
            allowed = value if value.dtype == torch.bool else value > float("-inf")
            keys = int(allowed.reshape(-1, allowed.shape[-1]).sum(-1).max())
        flops += 4 * q.shape[:-2].numel() * q.shape[-2] * q.shape[-1] * keys
    return int(flops)


def device_peak(device, cache=None):
    """(the device's peak FLOP/s, its dtype's name): the harness's own precision choice, train.py's MFU denominator.
    Where it is measured (CPUs, MPS, GPUs missing from the datasheet table) a short measurement on a shared machine
    can come out at half the real peak, doubling the MFU: the best of it and one PEAK_SECONDS long is kept. With a
    cache (a folder only the evaluator writes) the best of the first PEAK_MEASUREMENTS runs' figures is kept there
    and later runs reuse it: 1.6 s a run saved on a 2-core CPU, and every run's MFU over the same peak."""
    import torch
    import runtime
    # what the figure depends on: the machine, the device (a CPU's by its thread count), torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    key = f"{socket.gethostname()} {device.type} {name} torch {torch.__version__}"
    path = cache and Path(cache) / PEAK_FILE
    try:
        known = json.loads(path.read_text()) if path and path.is_file() else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if entry and entry.get("measured", 0) >= PEAK_MEASUREMENTS:
        return float(entry["peak_flops"]), str(entry["dtype"])
    precision = runtime.choose_precision(device.type)
    if (device.type == "cuda" and precision.dtype == torch.bfloat16
            and runtime.table_peak_flops(torch.cuda.get_device_name(device))):  # the datasheet's figure
        return precision.peak_flops, precision.name
    longer = runtime.measure_matmul_flops(precision.dtype, device.type, seconds=PEAK_SECONDS)
    peak = max(precision.peak_flops, longer, entry["peak_flops"] if entry and entry["dtype"] == precision.name else 0)
    if path:
        known[key] = {"peak_flops": peak, "dtype": precision.name, "measured": (entry or {}).get("measured", 0) + 1}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, path)
        except OSError:
            pass  # no cache: the next run measures again
    return peak, precision.name


def default_autocast(device, compiled):
    """bf16 on CUDA; on a CPU, bf16 for a compiled evaluation where the CPU computes it natively; else fp32."""
    import torch
    if device.type == "cuda":
        return "bfloat16"
    if device.type == "cpu" and compiled and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return "bfloat16"
    return None


def compile_function(fn, cache, private):
    """torch.compile for the CPU, compiled in this process with `cache` as inductor's cache: no compile worker
    processes, no cache a trainer could have written, and the working directory ours."""
    import torch
    import torch._inductor.config as inductor
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    inductor.compile_threads = 1
    inductor.fx_graph_remote_cache = inductor.autotune_remote_cache = False
    os.chdir(private)
    return torch.compile(fn, dynamic=False)


def isa_record_key():
    import torch
    return {"host": socket.gethostname(), "torch": torch.__version__}


def isa_check_record(cache, check=True):
    """Whether inductor's ISA check may be skipped on this host with this torch (see ISA_FILE), as recorded in the
    folder `cache`. With check, a missing record is made: the check runs here (it dlopens each ISA's test library
    in a child process), then the choice without it is compared with the choice it made."""
    path = Path(cache) / ISA_FILE
    try:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and {k: record.get(k) for k in isa_record_key()} == isa_record_key():
            return record.get("skip_check") is True
    except (OSError, ValueError):
        pass
    if not check:
        return False
    import torch._inductor.config as inductor
    if inductor.cpp.vec_isa_ok is not None:  # set by the environment: the check is not ours to judge
        return False
    from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list
    try:
        checked = str(pick_vec_isa())
        inductor.cpp.vec_isa_ok = True
        valid_vec_isa_list.cache_clear()
        unchecked = str(pick_vec_isa())
    finally:
        inductor.cpp.vec_isa_ok = None
        valid_vec_isa_list.cache_clear()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**isa_record_key(), "skip_check": checked == unchecked, "isa": checked}))
    os.replace(tmp, path)
    return checked == unchecked


def load_kernel(repo):
    """A hub kernel (FA3) from the local cache, never the network: installed third-party code, like torch."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from kernels import get_kernel
        get_kernel(repo)
    except Exception as e:
        raise EvalError(f"cannot load the kernel {repo} the graph uses ({type(e).__name__}: {e}); prepare fetches "
                        "it once, or export with PyTorch attention") from None


def evaluate(request):
    """Runs one request (see main) and returns the result dict; raises EvalError to refuse."""
    import numpy as np
    import torch
    import prepare
    import handover
    t_ready = time.time()
    private = Path(tempfile.mkdtemp(prefix="autoresearch-eval-"))
    try:
        tokenizer = private_copy(prepare, request, private / "cache")
        device = torch.device(request.get("device") or prepare.detect_device())
        compiled = request.get("compile")
        if compiled is None:  # by the evaluation's size: the rows every run scores, times their length
            n_val = len(prepare.load_split(tokenizer, "val")[0])
            scored = prepare.eval_rows(n_val, prepare.MAX_SEQ_LEN, prepare.EVAL_TOKENS) * prepare.MAX_SEQ_LEN
            compiled = device.type == "cpu" and scored >= COMPILE_MIN_TOKENS
        precision = request.get("autocast", default_autocast(device, compiled)) or "float32"
        if precision not in ("float32", *AUTOCAST_DTYPES):
            raise EvalError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)} or null, not {precision!r}")
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        T, V = prepare.MAX_SEQ_LEN, tokenizer.vocab_size
        if compiled:  # torch.compile's own imports (seconds), paid before the model exists
            import torch._dynamo  # noqa: F401
            import torch._inductor.compile_fx  # noqa: F401
        if request.get("wait"):  # started early (while train.py trains): everything before the graph is done
            if sys.stdin.readline().strip() != "go":
                raise EvalError("the run ended without handing a model over (the evaluator was told to stop)")

        t0 = time.time()
        graph_path = Path(request["graph"])
        try:
            graph_sha = _sha256_file(graph_path, copy_to=private / "model.graph")
        except OSError as e:
            raise EvalError(f"no model was handed over ({graph_path}: {e.strerror}): train.py must call "
                            "handover.export_model at the end of training") from None
        for repo in request.get("kernels", ()):  # registers a kernel's custom ops (FA3) before the graph names them
            load_kernel(repo)
        try:
            ep = handover.load_program(private / "model.graph", device, tuple(request.get("extra_ops", ())))
        except handover.HandoverError as e:
            raise EvalError(str(e)) from None
        (user_input,) = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        meta = next(n for n in ep.graph.nodes if n.name == user_input).meta.get("val")
        if meta is None or meta.dtype != torch.int64 or meta.dim() != 2 or meta.shape[1] != T:
            got = None if meta is None else f"{str(meta.dtype).removeprefix('torch.')} {tuple(meta.shape)}"
            raise EvalError(f"the graph takes {got}, not int64 token ids of shape (batch, {T}): export it with "
                            f"handover.export_model, which uses this profile's shape")
        B = int(meta.shape[0])
        check_output(ep, B, T, V)
        eager = ep.module()
        flops = forward_flops(ep, eager, B, T, device)
        flops_per_token = flops / (B * T) if flops else None

        def graph_and_score(x, y):
            """Our own scoring of the graph's logits for x, in fp32: every position's cross-entropy against y, and
            the logits' lowest and highest value (NaN and inf propagate to them: both finite means every logit is).
            Compiled as one program, the logits never reach memory in full."""
            f = eager(x).float()
            return torch.logsumexp(f, -1) - f.gather(-1, y[..., None]).squeeze(-1), f.amin(), f.amax()

        if compiled:
            cache = request.get("compile_cache")
            if device.type == "cpu" and cache and isa_check_record(cache, check=False):
                import torch._inductor.config as inductor
                inductor.cpp.vec_isa_ok = True  # as every run of this workspace compiles: one cache key
            graph_and_score = compile_function(graph_and_score, Path(cache or private / "inductor"), private)
        load_seconds = time.time() - t0

        rows, packed = val_rows(prepare, tokenizer, B, T)
        n_batches = len(packed) // B
        rng = np.random.default_rng(request.get("probe_seed", int.from_bytes(os.urandom(8), "little")))
        plan = probe_plan(n_batches, B, T, len(packed), rows, rng)
        token_bytes = torch.from_numpy(tokenizer.token_bytes).to(device)
        ctx = torch.autocast(device.type, dtype=getattr(torch, precision)) if precision != "float32" else None

        def run(x, y):
            """The cross-entropy of each position of x against y. Scored batches and probes alike: a pure graph
            cannot tell which way it is called."""
            with torch.no_grad(), (ctx or torch.no_grad()):
                nll, lowest, highest = graph_and_score(x, y)
            if not (torch.isfinite(lowest) and torch.isfinite(highest)):
                raise EvalError("the model produced non-finite logits (NaN or inf); val_bpb is not defined")
            return nll

        log("phase: evaluating")
        report_every = max(1, n_batches // prepare.EVAL_PROGRESS_LINES)
        total_nats, total_bytes, total_tokens, worst, probe_rows = 0.0, 0, 0, 0.0, 0
        tolerance = PROBE_TOLERANCE[precision]
        t0 = time.time()
        nll_rows = torch.empty((len(packed), T), dtype=torch.float32, device=device)  # every row's, as scored
        for done, b in enumerate(range(n_batches), 1):
            batch = torch.from_numpy(packed[b * B:(b + 1) * B]).to(device)
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # one layout every call: one compiled graph
            loss = run(x, y)
            nll_rows[b * B:(b + 1) * B] = loss
            nbytes = token_bytes[y]
            mask = nbytes > 0
            mask[rows - b * B:] = False  # padding rows: computed, never counted
            total_nats += torch.where(mask, loss.double(), 0.0).sum().item()
            total_bytes += int(torch.where(mask, nbytes, 0).sum().item())
            total_tokens += int(mask.sum().item())
            for entries in plan.get(b, []):
                picked = [row for row, _, _ in entries]
                probe = torch.from_numpy(packed[picked])
                for i, (_, donor, cut) in enumerate(entries):
                    probe[i, cut:T] = torch.from_numpy(packed[donor, cut:T])
                probe = probe.to(device)
                # scored against each row's own targets: the scored row's next tokens
                targets = torch.from_numpy(packed[picked, 1:]).to(device)
                diff = probe_diff(nll_rows[picked], run(probe[:, :-1].contiguous(), targets),
                                  [cut for _, _, cut in entries])
                worst, probe_rows = max(worst, diff), probe_rows + len(entries)
                if diff > tolerance:
                    raise EvalError(f"the model is not causal: changing the tokens after a position, or the other rows "
                                    f"of its batch, changed the log-probability it gave its next token by {diff:.3g} "
                                    f"nats (tolerance {tolerance:g}); val_bpb would measure a leak, not learning")
            if done % report_every == 0 or done == n_batches:
                log(f"eval: {min(done * B, rows)}/{rows} rows")
        eval_seconds = time.time() - t0
        peak_flops, peak_name = device_peak(device, request.get("compile_cache"))
        if device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            import resource
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10
        return {"ok": True, "val_bpb": total_nats / (math.log(2) * total_bytes), "profile": prepare.PROFILE.name,
                "dataset": prepare.DATASET, "rows_evaluated": rows, "tokens_evaluated": total_tokens,
                "bytes_evaluated": total_bytes, "eval_seconds": round(eval_seconds, 3),
                "load_seconds": round(load_seconds, 3), "startup_seconds": round(t_ready - T_START, 3),
                "peak_memory_mb": round(peak_mb, 1), "batch_rows": B, "precision": precision, "compiled": bool(compiled),
                "probe_rows": probe_rows, "probe_max_diff": worst, "graph_sha256": graph_sha,
                "forward_flops_per_token": flops_per_token, "peak_flops": peak_flops, "peak_flops_dtype": peak_name,
                "val_fingerprint": request["pins"]["data"]["val.bin"]}
    finally:
        shutil.rmtree(private, ignore_errors=True)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------

def check_request(request):
    """A request: {"graph": path of the handed-over file, "profile": name, "dataset": source, "cache": dir or null,
    "pins": {"harness": {file: sha256}, "data": {file: sha256}}, optional "device", "autocast" (bfloat16 | float16
    | null), "compile" (true | false | null: by the evaluation's size), "compile_cache" (a folder to keep compiled
    kernels in across runs: one no trainer can write), "kernels" (hub repos whose custom ops to register, e.g.
    FA3's), "extra_ops" (custom op names or torch.ops.<namespace>.* to allow besides the allow-list), "probe_seed"
    (a fixed probe plan), "wait" (true: the request is one line, sent before the model exists; the evaluator imports, checks the pins and copies the data,
    then waits for a line "go" on stdin before it reads the graph; anything else stops it)}."""
    if not isinstance(request, dict):
        return "the request must be one JSON object"
    for key in ("graph", "profile", "dataset", "pins"):
        if key not in request:
            return f"the request has no {key!r}"
    pins = request["pins"]
    if not isinstance(pins, dict) or not isinstance(pins.get("harness"), dict) or not isinstance(pins.get("data"), dict):
        return "pins must be {\"harness\": {file: sha256}, \"data\": {file: sha256}} (see --pins)"
    missing = [f for f in HARNESS_FILES if f not in pins["harness"]] + [f for f in DATA_FILES if f not in pins["data"]]
    if missing:
        return f"the request pins no sha256 for {', '.join(missing)} (see --pins)"
    return None


def main(argv=None):
    # The result goes to the real stdout only; anything else printed (by torch, say) lands on stderr.
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    parser = argparse.ArgumentParser(description="The trusted evaluator (reads a JSON request on stdin).")
    parser.add_argument("--pins", action="store_true", help="print the pins of the harness and a prepared dataset")
    parser.add_argument("--profile")
    parser.add_argument("--dataset", default="sotu")
    parser.add_argument("--cache")
    parser.add_argument("--isa-record", help="with --pins: the folder (the evaluator's compile cache) to record in "
                                             "whether inductor's ISA check may be skipped on this host")
    args = parser.parse_args(argv)

    def answer(result, code):
        result_out.write(json.dumps(result) + "\n")
        result_out.flush()
        return code

    if args.pins:
        if not args.profile:
            return answer({"ok": False, "error": "--pins needs --profile"}, 2)
        try:
            pins = compute_pins(args.profile, args.dataset, args.cache)
        except EvalError as e:
            return answer({"ok": False, "error": str(e)}, 1)
        if args.isa_record:
            try:
                isa_check_record(args.isa_record)
            except Exception as e:  # noqa: BLE001 - no record: every compile runs inductor's check, as by default
                log(f"no ISA record ({type(e).__name__}: {e})")
        return answer(pins, 0)
    try:
        first = sys.stdin.readline()  # one line; a request spread over lines is read to its end
        try:
            request = json.loads(first)
        except ValueError:
            request = json.loads(first + sys.stdin.read())
    except ValueError as e:
        return answer({"ok": False, "error": f"the request on stdin is not JSON ({e})"}, 2)
    problem = check_request(request)
    if problem:
        return answer({"ok": False, "error": problem}, 2)
    harness_env(str(request["profile"]), str(request["dataset"]), request.get("cache"))
    isolate(request["pins"]["harness"])
    try:
        return answer(evaluate(request), 0)
    except EvalError as e:
        return answer({"ok": False, "error": str(e)}, 1)
    except Exception as e:  # prepare.PrepareError, or the graph failing to run: one line, no traceback
        line = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
        return answer({"ok": False, "error": f"evaluation failed: {type(e).__name__}: {line}"[:500]}, 1)
    except SystemExit as e:  # prepare.py refused the settings (it printed why on stderr)
        return answer({"ok": False, "error": f"the harness refused the request's settings (exit {e.code})"}, 2)


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    os._exit(code)  # the answer is written and the private folder gone: skip the teardown of torch (~1 s on a CPU)
