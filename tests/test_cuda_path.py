"""The CUDA and MPS paths of train.py and runtime.py, proven on a CPU-only machine.

FakeTensorMode builds tensors on device "cuda" without a GPU (shapes and dtypes, no data), and CUDA autocast applies
to them: a forward of each profile's default model then shows the dtypes a real GPU run would see. Backward passes
cannot run on fake CUDA tensors in a CPU-only torch build (autograd asks for a CUDA device guard and aborts the
process), so the backward is traced on fake CPU tensors under CPU autocast. Kernels that cannot be traced without a
GPU (Flash Attention 3, flex_attention's CUDA path) are replaced by stubs that refuse what the real kernel refuses.
"""

import importlib
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import flex_attention as flex_module
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "training"
HALF = (torch.float16, torch.bfloat16)
# aten ops that wait for the device: reading a value back (.item(), bool(t), data-dependent shapes)
SYNC_OPS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default",
            "aten.nonzero.default", "aten.item.default"}


@pytest.fixture(scope="module")
def modules():
    """(train, runtime, prepare) imported in this process; train.py's script part does not run."""
    sys.path.insert(0, str(TRAINING))
    environ = dict(os.environ)
    try:
        train = importlib.import_module("train")
        yield train, importlib.import_module("runtime"), importlib.import_module("prepare")
    finally:
        sys.path.remove(str(TRAINING))
        os.environ.clear()
        os.environ.update(environ)


@pytest.fixture
def fresh_attention(modules, monkeypatch):
    """The runtime's attention state (backend, FA3 module, mask cache) restored after the test."""
    _, runtime, _ = modules
    monkeypatch.setattr(runtime, "_backend", None)
    monkeypatch.setattr(runtime, "_fa3", None)
    monkeypatch.setattr(runtime, "_masks", {})
    return runtime


def cuda_precision(runtime, bf16=True, name="NVIDIA H100 80GB HBM3"):
    """The Precision runtime chooses on a CUDA GPU with (Ampere+) or without (T4, V100) bf16."""
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        with mock.patch("torch.cuda.is_bf16_supported", lambda including_emulation=True: bf16), \
             mock.patch("torch.cuda.get_device_name", lambda *a: name), \
             mock.patch.object(runtime, "measure_matmul_flops", lambda *a, **k: 1e12):
            return runtime._choose_precision("cuda")
    finally:
        torch.set_float32_matmul_precision(matmul_precision)


@contextmanager
def cuda_autocast(precision):
    """precision.autocast(), built as if CUDA were present (autocast refuses "cuda" on a CPU-only build)."""
    with mock.patch("torch.cuda.is_available", lambda: True), \
         mock.patch("torch.cuda.is_bf16_supported", lambda including_emulation=True: True):
        ctx = precision.autocast()
    with ctx:
        yield


def embedding_to(self, dtype):
    """nn.Embedding.to(dtype) for fake tensors: Module.to swaps fake parameters in place, which a weak reference
    held by FakeTensorMode forbids; a new Parameter of the same shape and dtype is all a trace needs."""
    self.weight = torch.nn.Parameter(self.weight.to(dtype), requires_grad=self.weight.requires_grad)
    return self


_getitem = torch.Tensor.__getitem__


def basic_getitem(self, index):
    """Tensor indexing by ints, slices, None and ... through plain ops. Python indexing takes a CUDA device guard
    first, which a CPU-only build lacks, even for fake tensors."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index):
        return _getitem(self, index)
    out, dim = self, 0
    for i in index:
        if i is Ellipsis:
            dim += self.dim() - sum(isinstance(j, (int, slice)) for j in index)
        elif i is None:
            out, dim = out.unsqueeze(dim), dim + 1
        elif isinstance(i, int):
            out = out.select(dim, i)
        else:
            start, stop, step = i.indices(out.size(dim))
            out, dim = torch.ops.aten.slice.Tensor(out, dim, start, stop, step), dim + 1
    return out


def basic_contiguous(self, memory_format=torch.contiguous_format):
    """Tensor.contiguous through aten.clone: the Python method also takes a device guard first."""
    return self if self.is_contiguous(memory_format=memory_format) else torch.ops.aten.clone(self, memory_format=memory_format)


@contextmanager
def fake_device():
    """FakeTensorMode with random init as a no-op (a fake CUDA tensor has no generator; its values do not exist)."""
    with FakeTensorMode(allow_non_fake_inputs=True), \
         mock.patch.object(torch.Tensor, "normal_", lambda self, *a, **k: self), \
         mock.patch.object(torch.Tensor, "uniform_", lambda self, *a, **k: self), \
         mock.patch.object(torch.nn.Embedding, "to", embedding_to), \
         mock.patch.object(torch.Tensor, "__getitem__", basic_getitem), \
         mock.patch.object(torch.Tensor, "contiguous", basic_contiguous):
        yield


def profile_model(modules, monkeypatch, profile_name, device, dtype):
    """The default model train.py builds for a profile, initialised by its init_weights."""
    train, _, prepare = modules
    depth, aspect, head_dim, _, batch = train.PROFILE_DEFAULTS[profile_name]
    profile = prepare.PROFILES[profile_name]
    monkeypatch.setattr(train, "ASPECT_RATIO", aspect)
    monkeypatch.setattr(train, "HEAD_DIM", head_dim)
    config = train.build_config(depth, profile.vocab_size, profile.max_seq_len)
    with torch.device(device):  # train.py builds on meta and calls to_empty: on fake tensors that cannot swap
        model = train.GPT(config)
    if device == "cuda":
        model.requires_grad_(False)  # see the module docstring: no autograd on fake CUDA tensors
    model.init_weights(dtype=dtype)
    idx = torch.zeros(batch, profile.max_seq_len, dtype=torch.long, device=device)
    return model, idx


class Recorder:
    """Dtypes seen at train.py's attention call, at the kernels, and in the residual stream between blocks."""

    def __init__(self, modules, monkeypatch, model):
        train, runtime, _ = modules
        self.calls, self.kernels, self.stream = [], [], []

        def at_call(q, k, v, window):
            self.calls.append((q.dtype, k.dtype, v.dtype))
            return runtime.attention(q, k, v, window)
        monkeypatch.setattr(train, "attention", at_call)

        real_sdpa = torch.nn.functional.scaled_dot_product_attention

        def sdpa(q, k, v, **kw):
            self.kernels.append(("sdpa", q.dtype, k.dtype, v.dtype))
            return real_sdpa(q, k, v, **kw)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)

        def flex_attention(q, k, v, block_mask=None):
            self.kernels.append(("flex", q.dtype, k.dtype, v.dtype))
            return stub_kernel(q, k, v)
        monkeypatch.setattr(flex_module, "flex_attention", flex_attention)

        class FA3:
            @staticmethod
            def flash_attn_func(q, k, v, causal, window_size):
                self.kernels.append(("fa3", q.dtype, k.dtype, v.dtype))
                assert causal and window_size[1] == 0
                return stub_kernel(q, k, v)
        self.fa3 = FA3

        for block in model.transformer.h:
            block.register_forward_pre_hook(lambda m, args: self.stream.append(args[0].dtype))
            block.register_forward_hook(lambda m, args, out: self.stream.append(out.dtype))


def stub_kernel(q, k, v):
    """Stands in for FA3 / flex: refuses what FA3 refuses (anything but fp16/bf16, mixed dtypes), differentiable."""
    if q.dtype not in HALF or not q.dtype == k.dtype == v.dtype:
        raise RuntimeError(f"FlashAttention only supports fp16 and bf16, all alike: got {q.dtype}, {k.dtype}, {v.dtype}")
    return q + k + v


def use_backend(runtime, backend, recorder, T, windows, device):
    runtime.use_attention_backend(backend, recorder.fa3 if backend == "fa3" else None)
    if backend == "flex":  # block masks need real kernels to build; the stubbed flex_attention ignores them
        for window in windows:
            runtime._masks[("flex", T, window, device)] = None


CUDA_CASES = [(p, b, bf16) for p in ("gpu", "small", "cpu", "smoke") for b in ("fa3", "flex", "sdpa") for bf16 in (True,)]
CUDA_CASES += [(p, b, False) for p in ("gpu", "small") for b in ("flex", "sdpa")]  # T4/V100: fp16, no FA3


@pytest.mark.parametrize("profile_name,backend,bf16", CUDA_CASES)
def test_cuda_forward_keeps_attention_inputs_and_residual_stream_in_the_compute_dtype(
        modules, fresh_attention, monkeypatch, profile_name, backend, bf16):
    runtime = fresh_attention
    precision = cuda_precision(runtime, bf16=bf16)
    assert precision.dtype == (torch.bfloat16 if bf16 else torch.float16)
    with fake_device():
        model, idx = profile_model(modules, monkeypatch, profile_name, "cuda", precision.dtype)
        rec = Recorder(modules, monkeypatch, model)
        use_backend(runtime, backend, rec, idx.size(1), model.windows, "cuda")
        with cuda_autocast(precision):
            logits = model(idx)
            loss = model(idx, idx)
    dtype = precision.dtype
    assert rec.calls and all(call == (dtype, dtype, dtype) for call in rec.calls), rec.calls[:2]
    assert rec.kernels and all(kernel[1:] == (dtype, dtype, dtype) for kernel in rec.kernels), rec.kernels[:2]
    used = {kernel[0] for kernel in rec.kernels}
    assert used == ({"sdpa"} if backend == "sdpa" else {backend, "sdpa"} if backend == "flex" else {"fa3"})
    assert set(rec.stream) == {dtype}, "the residual stream left the compute dtype"
    assert logits.device.type == "cuda" and logits.dtype == torch.float32  # soft-capped in fp32
    assert logits.shape == (*idx.shape, model.config.vocab_size)
    assert loss.dim() == 0 and loss.dtype == torch.float32


@pytest.mark.parametrize("profile_name", ["gpu", "small", "cpu", "smoke"])
@pytest.mark.parametrize("backend", ["fa3", "flex", "sdpa"])
def test_backward_reaches_every_parameter_in_its_own_dtype(modules, fresh_attention, monkeypatch, profile_name,
                                                           backend):
    runtime = fresh_attention
    precision = runtime.Precision("cpu", torch.bfloat16, "bf16", 1e12)
    with fake_device():
        model, idx = profile_model(modules, monkeypatch, profile_name, "cpu", precision.dtype)
        rec = Recorder(modules, monkeypatch, model)
        use_backend(runtime, backend, rec, idx.size(1), model.windows, "cpu")
        with precision.autocast():
            loss = model(idx, idx)
        loss.backward()
    assert rec.kernels and all(kernel[1:] == (torch.bfloat16,) * 3 for kernel in rec.kernels)
    assert set(rec.stream) == {torch.bfloat16}
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and p.grad.shape == p.shape, name


class SyncCounter(TorchDispatchMode):
    """Counts the ops that would make the host wait for a CUDA device."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        to_host = name in ("aten._to_copy.default", "aten.copy_.default") and \
            torch.device(kwargs.get("device") or args[0].device).type == "cpu" and \
            any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in args)
        if name in SYNC_OPS or to_host:
            self.syncs.append(name)
        return func(*args, **kwargs)


def test_cuda_forward_and_optimizer_steps_never_wait_for_the_device(modules, fresh_attention, monkeypatch):
    """On CUDA the hot loop's only sync is train.py's one .item() of the loss (see the smoke-run test below): the
    model and both optimizers (with a schedule moving lr, momentum and weight decay) queue work and never read back."""
    train, runtime, _ = modules
    precision = cuda_precision(runtime)
    with fake_device():
        model, idx = profile_model(modules, monkeypatch, "smoke", "cuda", precision.dtype)
        rec = Recorder(modules, monkeypatch, model)
        use_backend(runtime, "fa3", rec, idx.size(1), model.windows, "cuda")
        optimizers = train.setup_optimizers(model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        counter = SyncCounter()
        with counter:
            with cuda_autocast(precision):
                model(idx, idx)
            for progress in (0.0, 0.5, 0.9):
                for group in optimizers[1].param_groups:
                    group["momentum"] = train.muon_momentum(progress)
                    group["weight_decay"] = train.muon_weight_decay(progress)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["initial_lr"] * train.lr_multiplier(progress)
                    opt.step()
    assert counter.syncs == []


# Runs train.py as a script with the tensor methods that read a value back to the host wrapped: each call prints a
# SYNC line. (A TorchDispatchMode would see every op, but slows a step ~20x.) Counted whatever the tensor's device,
# since on CUDA each of them waits for the device.
SYNC_PROBE = """
import functools, runpy, sys, torch
def probe(name, method):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        print("SYNC", name, flush=True)
        return method(*args, **kwargs)
    return wrapper
for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
    setattr(torch.Tensor, name, probe(name, getattr(torch.Tensor, name)))
runpy.run_path(sys.argv[1], run_name="__main__")
"""


def test_each_training_step_reads_back_from_the_device_once(prepared_cache, tmp_path):
    """The real train.py loop (smoke profile, eager): each step reads one value back (the loss, for the fail-fast
    check and the step line)."""
    probe = tmp_path / "probe.py"
    probe.write_text(SYNC_PROBE)
    env = {**os.environ, "AUTORESEARCH_PROFILE": "smoke", "AUTORESEARCH_TIME_BUDGET": "2",
           "AUTORESEARCH_CACHE": str(prepared_cache), "AUTORESEARCH_DATASET": "sotu", "PYTHONPATH": str(TRAINING)}
    proc = subprocess.run([sys.executable, str(probe), str(TRAINING / "train.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    steps = [i for i, line in enumerate(lines) if line.startswith("step ")]
    assert len(steps) >= 2  # the untimed step and at least one timed one
    loop_start = next(i for i, line in enumerate(lines) if line.startswith("phase: "))
    bounds = [loop_start] + steps  # each step's work prints between the previous step line and its own
    per_step = [sum(line.startswith("SYNC") for line in lines[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert all(n == 1 for n in per_step), per_step
    phases = [line for line in lines if line.startswith("phase: ")]
    assert phases[:2] == ["phase: warm-up", "phase: training"]  # smoke runs are not compiled


def test_schedule_moves_do_not_recompile_the_muon_update(modules, monkeypatch):
    from torch._dynamo.testing import CompileCounter
    train, runtime, _ = modules
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: torch._dynamo.optimize(counter, nopython=True)(fn))
    monkeypatch.setattr(train, "COMPILE", True)
    monkeypatch.setattr(runtime, "COMPILE_SMALL_FUNCTIONS", True)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 8)) for _ in range(2)]
    muon = train.Muon([dict(params=params)], lr=0.04, weight_decay=0.2)
    muon.param_groups[0]["initial_lr"] = 0.04
    assert muon.compiled
    for i, progress in enumerate((0.0, 0.2, 0.6, 0.95)):
        for p in params:
            p.grad = torch.randn_like(p)
        group = muon.param_groups[0]
        group["lr"] = group["initial_lr"] * train.lr_multiplier(progress)
        group["momentum"] = train.muon_momentum(progress)
        group["weight_decay"] = train.muon_weight_decay(progress)
        muon.step()
        if i == 0:
            compiled_once = counter.frame_count
    assert compiled_once == 1 and counter.frame_count == 1
    torch._dynamo.reset()


def test_eager_muon_takes_python_floats_and_matches_the_compiled_convention(modules, monkeypatch):
    """MPS kernels refuse 0-d CPU tensors in lerp_: uncompiled Muon passes floats, with the same result."""
    train, _, _ = modules
    seen = []
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(2)]
    grads = [torch.randn_like(p) for p in params]
    reference = [p.detach().clone() for p in params]
    muon = train.Muon([dict(params=params)], lr=0.04, weight_decay=0.2)
    assert not muon.compiled
    update = muon.update
    muon.update = lambda *args: (seen.extend(type(a) for a in args[4:]), update(*args))
    for p, g in zip(params, grads):
        p.grad = g
    muon.step()
    assert seen == [float] * 4
    # the same step with 0-d tensors, as the compiled path passes them
    stacked = torch.stack(reference)
    momentum_buf, variance_buf = torch.zeros(2, 8, 16), torch.zeros(2, 1, 16)
    train.muon_update(torch.stack(grads), stacked, momentum_buf, variance_buf,
                      *torch.tensor([0.95, 0.04 * max(1.0, 8 / 16) ** 0.5, 0.2, 0.95]).unbind())
    torch.testing.assert_close(torch.stack([p.detach() for p in params]), stacked)


def test_orthogonalize_computes_in_the_dtype_it_is_given(modules):
    train, _, _ = modules
    g = torch.randn(2, 16, 8)
    assert train.orthogonalize(g, dtype=torch.float32).dtype == torch.float32
    assert train.orthogonalize(g, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert train.orthogonalize(g).dtype == train.PRECISION.dtype


@pytest.mark.parametrize("peaks,expected", [
    ({torch.float32: 1e11, torch.bfloat16: 4e11}, "bf16"),   # native bf16 (AVX512-BF16, AMX, Apple M2+)
    ({torch.float32: 1e11, torch.bfloat16: 1e9}, "fp32"),    # emulated bf16
    ({torch.float32: 1e11, torch.bfloat16: None}, "fp32"),   # no bf16 at all (MPS on macOS 13)
])
def test_cpu_and_mps_measure_bf16_against_fp32_and_fall_back(modules, peaks, expected):
    _, runtime, _ = modules

    def measure(dtype, device_type, **kw):
        if peaks[dtype] is None:
            raise RuntimeError("MPS BFloat16 is only supported on macOS 14 or newer")
        return peaks[dtype]
    with mock.patch.object(runtime, "measure_matmul_flops", measure):
        precision = runtime._choose_precision("cpu")
    assert precision.name == expected
    assert precision.peak_flops == max(v for v in peaks.values() if v)
    assert (precision.autocast().__class__.__name__ == "nullcontext") == (expected == "fp32")
    assert not precision.grad_scaler().is_enabled()


@pytest.mark.parametrize("gpu_name,flops", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA B200", 2.25e15),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362.05e12), ("NVIDIA L40", 181.05e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA GeForce RTX 3090", 71e12), ("Tesla T4", None), ("NVIDIA RTX A6000", None),
])
def test_peak_flops_table_matches_each_card_to_its_own_row(modules, gpu_name, flops):
    _, runtime, _ = modules
    assert runtime.table_peak_flops(gpu_name) == flops


def test_gpus_pick_bf16_or_fp16_with_loss_scaling_and_name_it(modules):
    _, runtime, _ = modules
    h100 = cuda_precision(runtime, name="NVIDIA H100 PCIe")
    assert (h100.name, h100.peak_flops) == ("bf16", 756e12)
    t4 = cuda_precision(runtime, bf16=False, name="Tesla T4")
    assert (t4.dtype, t4.name, t4.peak_flops) == (torch.float16, "fp16+loss-scaling", 1e12)  # measured (mocked)
    with mock.patch("torch.cuda.is_available", lambda: True):
        assert t4.grad_scaler().is_enabled()


def test_attention_backend_falls_back_once_and_logs_why(modules, fresh_attention, monkeypatch, capsys):
    runtime = fresh_attention
    monkeypatch.setattr(runtime, "DEVICE_TYPE", "cuda")
    monkeypatch.setattr(runtime, "choose_precision", lambda *a: cuda_precision(runtime))

    def no_fa3():
        raise ImportError("No module named 'kernels'")
    monkeypatch.setattr(runtime, "_load_fa3", no_fa3)
    assert runtime.attention_backend() == "flex"
    assert runtime.attention_backend() == "flex"
    out = capsys.readouterr().out
    assert out.count("Flash Attention 3 not available (ImportError") == 1


def test_masks_built_before_compiling_spare_a_recompile(modules, fresh_attention):
    """A cache filled while dynamo traces is a recompile waiting to happen; built up front, one compile serves."""
    from torch._dynamo.testing import CompileCounter
    train, runtime, _ = modules
    runtime.use_attention_backend("sdpa")
    config = train.GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32, window_pattern="SL")
    model = train.GPT(config)
    model.init_weights()
    idx = torch.randint(0, 97, (2, 32))
    runtime.build_attention_masks(32, model.windows, "cpu")
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch._dynamo.optimize(counter)(model)
    for _ in range(3):
        compiled(idx)
    assert counter.frame_count == 1
    torch._dynamo.reset()
