"""
Runtime utilities of the frozen harness, imported by train.py: which device, which precision, how to wait for the
device, how much memory a run peaked at, the device's peak FLOP/s, a default causal attention, and the progress
`phase:` lines the server reads. train.py stays free to replace any of them; the agent may read this file, never
change it. Importing it is cheap: the measurements (matmul peaks, kernel loading) run on first use.
"""

import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Dense (no 2:4 sparsity) bf16 tensor-core peaks with fp32 accumulation, per GPU, from NVIDIA's datasheets.
# Matched as whole words in torch.cuda.get_device_name(), first hit wins: the PCIe/NVL rows come before the bare
# name, so an "H100 PCIe" never takes the SXM figure, and "L4" never matches an "L40S".
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12),  # bare "H100 80GB HBM3" is the SXM card
    ("H200 NVL", 835e12), ("H200", 989.5e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("L40S", 362.05e12), ("L40", 181.05e12), ("L4", 121e12),
    ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
]
# Square matmul side for the measured peak: large enough that launch overhead is noise on each kind of device
MATMUL_SIZE = {"cuda": 8192, "mps": 4096, "cpu": 1024}
MEASURE_SECONDS = 0.25


def detect_device():
    """cuda, mps or cpu: the best device this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DEVICE_TYPE = detect_device()
DEVICE = torch.device(DEVICE_TYPE)
# torch.compile works on CUDA and CPU (on MPS it is still immature). Small launch-bound functions such as an
# optimizer step only gain on a GPU; on a CPU they cost seconds of compilation per shape for little.
COMPILE_MODEL = DEVICE_TYPE in ("cuda", "cpu")
COMPILE_SMALL_FUNCTIONS = DEVICE_TYPE == "cuda"


def phase(name):
    """Announce a progress phase to the server (log protocol: starting|compiling|warm-up|training|...)."""
    print(f"phase: {name}", flush=True)


def sync(device_type=DEVICE_TYPE):
    """Wait for queued device work, so that wall-clock timings measure it."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device_type=DEVICE_TYPE):
    """Peak memory of this process on the device (MiB): allocated tensors on CUDA, the driver's total on MPS (its
    allocator keeps what it once took, so this is close to the peak), the resident set size on a CPU."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    if device_type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux

# ---------------------------------------------------------------------------
# Precision and peak FLOP/s
# ---------------------------------------------------------------------------

def measure_matmul_flops(dtype, device_type=DEVICE_TYPE, size=None, seconds=MEASURE_SECONDS):
    """Best square-matmul throughput (FLOP/s) in `dtype`: the denominator of MFU where no datasheet figure applies.
    Stops early where one matmul already takes longer than the whole allowance (emulated bf16 on old CPUs)."""
    size = size or MATMUL_SIZE[device_type]
    a = torch.randn(size, size, device=device_type, dtype=dtype)
    b = torch.randn(size, size, device=device_type, dtype=dtype)
    a @ b  # first call pays for library initialisation
    sync(device_type)
    best = 0.0
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds / 3:
            a @ b
            n += 1
        sync(device_type)
        elapsed = time.perf_counter() - t0
        best = max(best, 2 * size**3 * n / elapsed)
        if elapsed > seconds:
            break
    return best


def table_peak_flops(gpu_name):
    """The datasheet bf16 peak for a GPU name such as "NVIDIA H100 PCIe", or None for a GPU not in the table."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if re.search(rf"\b{re.escape(key)}\b", gpu_name)), None)


@dataclass(frozen=True)
class Precision:
    """How the run computes: autocast to `dtype` (fp32 master weights), with loss scaling for fp16."""
    device_type: str
    dtype: torch.dtype
    name: str          # for the header line: bf16 | fp16+loss-scaling | fp32
    peak_flops: float  # the device's peak in this dtype, MFU's denominator

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.amp.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """A GradScaler that only scales for fp16 (bf16 and fp32 have fp32's range); disabled, it is a pass-through."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def _choose_precision(device_type):
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever stays fp32
        # bf16 on Ampere and later; older GPUs (T4, V100) have fast fp16 but no bf16
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        peak = (table_peak_flops(torch.cuda.get_device_name()) if dtype == torch.bfloat16 else None) \
            or measure_matmul_flops(dtype, device_type)
    else:
        # On a CPU or Apple GPU bf16 may be native (about 4x fp32 with AVX512-BF16/AMX), emulated (slower than
        # fp32), or missing (MPS before macOS 14): measure both and keep the faster.
        peaks = {torch.float32: measure_matmul_flops(torch.float32, device_type)}
        try:
            peaks[torch.bfloat16] = measure_matmul_flops(torch.bfloat16, device_type)
            with torch.amp.autocast(device_type=device_type, dtype=torch.bfloat16):
                torch.ones(2, 2, device=device_type) @ torch.ones(2, 2, device=device_type)
        except (RuntimeError, TypeError):
            peaks.pop(torch.bfloat16, None)
        dtype = max(peaks, key=peaks.get)
        peak = peaks[dtype]
    name = {torch.bfloat16: "bf16", torch.float16: "fp16+loss-scaling", torch.float32: "fp32"}[dtype]
    return Precision(device_type, dtype, name, peak)


_precision = {}


def choose_precision(device_type=DEVICE_TYPE):
    """The compute precision for this device, chosen (and measured where need be) once per process."""
    if device_type not in _precision:
        _precision[device_type] = _choose_precision(device_type)
    return _precision[device_type]

# ---------------------------------------------------------------------------
# Attention: q, k, v are (B, T, H, D); query t sees itself and the `window` tokens before it
# ---------------------------------------------------------------------------

_backend = None  # "fa3" | "flex" | "sdpa", chosen once by attention_backend()
_fa3 = None      # the Flash Attention 3 module, when it loaded
_masks = {}      # (backend, T, window, device type) -> SDPA boolean mask or flex BlockMask


def _load_fa3():
    """Flash Attention 3 from the `kernels` hub (downloaded on first use): Hopper's build, else the community one."""
    from kernels import get_kernel
    repo = "varunneal/flash-attention-3" if torch.cuda.get_device_capability() == (9, 0) else "kernels-community/flash-attn3"
    return get_kernel(repo).flash_attn_interface


def attention_backend():
    """fa3 on a CUDA GPU computing in fp16/bf16 where the kernel loads, else flex (CUDA), else SDPA. Decided once;
    a fallback is logged once, with the reason."""
    global _backend, _fa3
    if _backend is None:
        _backend = "sdpa"
        if DEVICE_TYPE == "cuda":
            _backend = "flex"
            if choose_precision().dtype == torch.float32:
                print("attention: Flash Attention 3 needs fp16/bf16; using flex_attention + SDPA", flush=True)
            else:
                try:
                    _fa3 = _load_fa3()
                    _backend = "fa3"
                except Exception as e:
                    print(f"attention: Flash Attention 3 not available ({type(e).__name__}: {e}); "
                          "using flex_attention + SDPA", flush=True)
    return _backend


def use_attention_backend(name, fa3_module=None):
    """Force a backend (tests, or a train.py that knows better)."""
    global _backend, _fa3
    assert name in KERNELS, f"unknown attention backend {name!r}: choose one of {', '.join(KERNELS)}"
    _backend, _fa3 = name, fa3_module or _fa3


@contextmanager
def portable_attention():
    """SDPA for the duration, whatever backend trains: the hand-over (training/handover.py) exports the model under
    it. flex_attention's BlockMask does not serialize (torch 2.11 on an H200) and FA3 is a hub kernel the evaluator
    would have to load; SDPA computes the same causal sliding-window attention with a boolean mask."""
    global _backend
    previous = attention_backend()
    _backend = "sdpa"
    try:
        yield
    finally:
        _backend = previous


def sliding_window_mask(T, window, device):
    """Boolean (T, T) mask, True where query i may attend key j: causal and at most `window` tokens back."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return (j <= i) & (i - j <= window)


def _flex_block_mask(T, window, device):
    from torch.nn.attention.flex_attention import create_block_mask
    def sliding_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(sliding_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)


def build_attention_masks(T, windows, device=DEVICE):
    """Build the masks of every sliding window up front. Call it before torch.compile: a cache filled while dynamo
    traces changes under its feet, and the graph is recompiled (on a CPU that about doubles compile time)."""
    backend = attention_backend()
    for window in set(windows):
        key = (backend, T, window, torch.device(device).type)
        if window < T - 1 and key not in _masks and backend != "fa3":
            build = _flex_block_mask if backend == "flex" else sliding_window_mask
            _masks[key] = build(T, window, device)


def _mask(T, window, device):
    key = (_backend, T, window, device.type)
    if key not in _masks:  # not built up front: fine eagerly, a recompile when compiled
        build_attention_masks(T, [window], device)
    return _masks[key]


def _sdpa(q, k, v, window):
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_mask(T, window, q.device))
    return y.transpose(1, 2)


def _flex(q, k, v, window):
    T = q.size(1)
    if window >= T - 1:  # full causal layers: SDPA's flash kernel
        return _sdpa(q, k, v, window)
    from torch.nn.attention.flex_attention import flex_attention
    y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=_mask(T, window, q.device))
    return y.transpose(1, 2)


def _fa3_attention(q, k, v, window):
    y = _fa3.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
    return y[0] if isinstance(y, tuple) else y  # some builds also return the log-sum-exp


KERNELS = {"fa3": _fa3_attention, "flex": _flex, "sdpa": _sdpa}


def attention(q, k, v, window):
    """Causal attention over (B, T, H, D) tensors; each query sees itself and the `window` tokens before it.
    Under autocast, q, k and v reach the kernel in the autocast dtype: a stray fp32 tensor (an fp32-only op such as
    rms_norm on CUDA autocast) would make FA3 refuse the call and SDPA fall back to a slow kernel."""
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return KERNELS[_backend or attention_backend()](q, k, v, window)
