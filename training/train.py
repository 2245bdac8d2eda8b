"""
Pretrain a small GPT for a fixed wall-clock budget and report val_bpb. This is the one file the agent edits.

Runs on CUDA, Apple MPS or CPU. The harness constants (context length, time budget, eval set, vocab, seed) come
from prepare.py and the active profile; everything in this file is fair game for experiments.
Usage, from the workspace root: python training/train.py
"""

import os
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import gc
import math
import sys
import time
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import PROFILE, MAX_SEQ_LEN, TIME_BUDGET, DATASET, SEED, Tokenizer, make_dataloader, evaluate_bpb
from feeder import WARMUP_TOKENS
import runtime
from runtime import DEVICE, attention, phase, sync

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags)
# ---------------------------------------------------------------------------

# Model size and batch per profile, so that a bare run makes sensible use of the machine class the profile
# targets. gpu = the upstream H100 setup. Keep a step (TOTAL_BATCH_SIZE tokens) under ~2 s: the server shows
# one progress line per step.
#          depth  aspect  head_dim  total batch  device batch (rows of MAX_SEQ_LEN tokens)
PROFILE_DEFAULTS = {
    "gpu":   (8,    64,     128,      2**19,       128),
    "small": (6,    64,     64,       2**15,       16),
    "cpu":   (4,    64,     64,       2**13,       8),
    "smoke": (2,    32,     32,       2**11,       8),
}
DEPTH, ASPECT_RATIO, HEAD_DIM, TOTAL_BATCH_SIZE, DEVICE_BATCH_SIZE = PROFILE_DEFAULTS[PROFILE.name]
WINDOW_PATTERN = "SSSL"  # per layer, cycled: S = half-context sliding window, L = full context; last is always L

# Optimization
EMBEDDING_LR = 0.6        # token and value embeddings (AdamW)
UNEMBEDDING_LR = 0.004    # lm_head (AdamW)
MATRIX_LR = 0.04          # all 2D weights inside the blocks (Muon)
SCALAR_LR = 0.5           # per-layer residual / x0 scalars (AdamW)
WEIGHT_DECAY = 0.2        # cautious weight decay for Muon, decays linearly to 0 over the budget
ADAM_BETAS = (0.8, 0.95)
WARMUP_RATIO = 0.0        # fraction of the time budget spent ramping the LR up
WARMDOWN_RATIO = 0.5      # fraction of the time budget spent ramping the LR down to FINAL_LR_FRAC
FINAL_LR_FRAC = 0.0
MOMENTUM_RAMP_RATIO = 0.3 # Muon momentum goes 0.85 -> 0.95 over this fraction of the budget

# torch.compile fuses the elementwise work around the matmuls (norms, rotary, ReLU², the soft-capped loss over
# the vocab), which is memory-bound and on a CPU costs as much as the matmuls themselves. Smoke runs last seconds,
# less than compiling takes.
COMPILE = runtime.COMPILE_MODEL and PROFILE.name != "smoke"
PRECISION = runtime.choose_precision()  # bf16, fp16 with loss scaling or fp32: autocast dtype and MFU's peak

# ---------------------------------------------------------------------------
# GPT model
# ---------------------------------------------------------------------------

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    # CUDA autocast computes rms_norm in fp32 (torch >= 2.12) and would hand that fp32 on: to attention (FA3 takes
    # only fp16/bf16) and into the residual stream. Cast back so the stream stays in the compute dtype.
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def has_value_embedding(layer_idx, n_layer):
    # every other layer, counted back from the last, which always has one
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); rotate the two halves of each head as pairs
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_v = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # Value embeddings are mixed in per head with a gate computed from a few channels of the input
        self.ve_gate_channels = min(32, config.n_embd)
        self.ve_gate = None
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = nn.Linear(self.ve_gate_channels, config.n_head, bias=False)

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:
            # gate in (0, 2), 1 at init: the value embedding starts as a plain residual on the values
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded whatever the LR does to the weights
        y = attention(q, k, v, window)
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = self.window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Per layer: x <- resid_lambda * x + x0_lambda * x0, where x0 is the (normed) token embedding
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, config.n_embd)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    @staticmethod
    def window_sizes(config):
        long, short = config.sequence_len, config.sequence_len // 2
        windows = [long if config.window_pattern[i % len(config.window_pattern)] == "L" else short
                   for i in range(config.n_layer)]
        windows[-1] = long  # the last layer always sees the whole context
        return windows

    @torch.no_grad()
    def init_weights(self, dtype=torch.float32):
        """Initialize parameters; embeddings are stored in `dtype` (bf16 saves memory traffic when autocasting)."""
        C = self.config.n_embd
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)  # near-uniform predictions at step 0
        s = 3**0.5 * C**-0.5  # uniform(-s, s) has std 1/sqrt(C)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            # output projections start at zero, so every block starts as the identity
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        # Rotary tables for 10x the training context, so longer inputs at inference still work
        head_dim = C // self.config.n_head
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=self.lm_head.weight.device) / head_dim
        inv_freq = torch.exp(-math.log(10000) * exponents)  # 10000^-(2i/D)
        t = torch.arange(10 * self.config.sequence_len, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2) broadcasts over batch and heads
        self.cos, self.sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
        self.transformer.wte.to(dtype=dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=dtype)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention scores and values."""
        embedding_params = self.transformer.wte.weight.numel() + sum(ve.weight.numel() for ve in self.value_embeds.values())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        matmul_params = self.num_params() - embedding_params - scalars
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_embd * min(w, T) for w in self.windows)
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None, reduction="mean"):
        B, T = idx.size()
        cos_sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.windows[i])
        logits = self.lm_head(norm(x)).float()
        softcap = 15  # smoothly bounds logits to (-15, 15)
        logits = softcap * torch.tanh(logits / softcap)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1, reduction=reduction)

# ---------------------------------------------------------------------------
# Optimizer: Muon for the matrices inside the blocks, AdamW for everything else
# ---------------------------------------------------------------------------

# Polar Express (Amsel et al. 2025): per-iteration odd-polynomial coefficients that drive all singular values
# towards 1 faster than fixed Newton-Schulz coefficients.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(g, dtype=None):
    """Approximate U V^T of a batch of matrices g = U S V^T. It only needs to be roughly orthogonal, so it runs in
    the compute dtype (bf16 where the device has it)."""
    X = g.to(dtype or PRECISION.dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= 1, with a safety margin
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        X = X.mT
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


def muon_update(grads, params, momentum_buf, variance_buf, momentum, lr, weight_decay, beta2):
    """One Muon step for a stack of same-shape matrices: (S, rows, cols)."""
    # Nesterov momentum
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buf, momentum)
    g = orthogonalize(g)
    # NorMuon: normalize each output neuron (row, or column for wide matrices) by a running estimate of its
    # update's second moment, then rescale so the update keeps the Frobenius norm orthogonalization gave it
    reduce_dim = -1 if g.size(-2) >= g.size(-1) else -2
    g = g.float()
    v = g.square().mean(dim=reduce_dim, keepdim=True)
    variance_buf.lerp_(v, 1 - beta2)
    scaled = g * variance_buf.clamp_min(1e-10).rsqrt()
    g = scaled * (g.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10))
    # Cautious weight decay: only decay coordinates where the update already pushes the weight towards zero
    decay = (g * params >= 0).to(g.dtype) * params
    params.sub_(lr * (g + weight_decay * decay))


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, here with Polar Express and NorMuon. 2D parameters only;
    parameters of one group must share a shape, so they are updated as one batched stack."""

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, beta2=0.95):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, beta2=beta2))
        # Compiled where that pays (a GPU, where the update is launch-bound). On a CPU it is a small share of the
        # step and each matrix shape would cost seconds of compilation.
        self.compiled = COMPILE and runtime.COMPILE_SMALL_FUNCTIONS
        self.update = torch.compile(muon_update, dynamic=False, fullgraph=True) if self.compiled else muon_update

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            rows, cols = params[0].shape
            state = self.state[params[0]]
            if not state:
                state["momentum_buf"] = torch.zeros(len(params), rows, cols, device=params[0].device)
                variance_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                state["variance_buf"] = torch.zeros(variance_shape, device=params[0].device)
            stacked = torch.stack(params)
            # scale the LR for tall matrices, whose orthogonalized updates have smaller entries
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5
            hp = [group["momentum"], lr, group["weight_decay"], group["beta2"]]
            if self.compiled:
                # as 0-d CPU tensors, a compiled update is not recompiled whenever a schedule moves, and (unlike
                # device tensors) they cost no host-to-device copy. Eager MPS kernels refuse them: floats there.
                hp = torch.tensor(hp).unbind()
            self.update(torch.stack([p.grad for p in params]), stacked, state["momentum_buf"], state["variance_buf"], *hp)
            torch._foreach_copy_(params, list(stacked.unbind(0)))


def setup_optimizers(model):
    C = model.config.n_embd
    # AdamW LRs were tuned at width 768; scale as 1/sqrt(width)
    scale = (C / 768) ** -0.5
    adam_groups = [
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * scale),
        dict(params=[model.transformer.wte.weight], lr=EMBEDDING_LR * scale),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * scale),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, betas=(0.96, 0.95)),
    ]
    adamw = torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0,
                              fused=True)
    matrices = list(model.transformer.h.parameters())
    shapes = sorted({p.shape for p in matrices})
    muon = Muon([dict(params=[p for p in matrices if p.shape == s]) for s in shapes],
                lr=MATRIX_LR, weight_decay=WEIGHT_DECAY)
    optimizers = [adamw, muon]
    n_assigned = sum(len(g["params"]) for opt in optimizers for g in opt.param_groups)
    assert n_assigned == len(list(model.parameters())), "every parameter belongs to exactly one optimizer group"
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def build_config(depth, vocab_size, sequence_len):
    # width = depth * ASPECT_RATIO, rounded up to whole heads
    n_embd = math.ceil(depth * ASPECT_RATIO / HEAD_DIM) * HEAD_DIM
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_embd // HEAD_DIM, n_embd=n_embd, window_pattern=WINDOW_PATTERN)

# ---------------------------------------------------------------------------
# Schedules, all driven by progress = training seconds so far / TIME_BUDGET
# ---------------------------------------------------------------------------

def lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def muon_momentum(progress):
    frac = min(progress / MOMENTUM_RAMP_RATIO, 1.0)
    return 0.85 + frac * (0.95 - 0.85)


def muon_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    t_start = time.time()
    torch.manual_seed(SEED)

    tokenizer = Tokenizer.load()
    vocab_size = tokenizer.get_vocab_size()
    config = build_config(DEPTH, vocab_size, MAX_SEQ_LEN)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=DEVICE)
    model.init_weights(dtype=PRECISION.dtype)
    num_params = model.num_params()
    num_flops_per_token = model.estimate_flops()
    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, "TOTAL_BATCH_SIZE must be a multiple of DEVICE_BATCH_SIZE * MAX_SEQ_LEN"
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

    print(f"profile: {PROFILE.name} | dataset: {DATASET} | device: {DEVICE.type} | seed: {SEED}")
    print(f"model: {asdict(config)}")
    print(f"parameters: {num_params:,} | FLOPs/token: {num_flops_per_token:.3e}")
    print(f"precision: {PRECISION.name} | compile: {COMPILE} | attention: {runtime.attention_backend()} "
          f"| peak FLOP/s for MFU: {PRECISION.peak_flops:.3g}")
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens = {grad_accum_steps} x {DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} | time budget: {TIME_BUDGET}s")

    runtime.build_attention_masks(MAX_SEQ_LEN, model.windows)  # before compiling, so tracing finds them built
    optimizers = setup_optimizers(model)
    scaler = PRECISION.grad_scaler()  # loss scaling for fp16, a pass-through otherwise
    train_model = torch.compile(model, dynamic=False) if COMPILE else model
    # the first steps pay for compilation and allocator warm-up, so they do not count against the budget: the
    # harness's allowance for this profile (the feeder serves the same tokens untimed in a server's run)
    untimed_steps = max(1, WARMUP_TOKENS[PROFILE.name] // TOTAL_BATCH_SIZE)
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=DEVICE)
    # in a run the server started, the harness's feeder owns the clock: its warm-up allowance, then wall time
    feeder_clock = hasattr(train_loader, "training_seconds")
    x, y, epoch = next(train_loader)

    t_start_training = time.time()
    total_training_time = 0.0
    smooth_loss = 0.0
    step = 0
    phase("compiling" if COMPILE else "warm-up")
    while True:
        untimed = train_loader.phase == "warm-up" if feeder_clock else step < untimed_steps
        if step == 1 and COMPILE and untimed:
            phase("warm-up")
        if step == untimed_steps and not feeder_clock:  # the feeder announces it when its clock starts
            phase("training")
        sync()
        t0 = time.time()
        for _ in range(grad_accum_steps):
            with PRECISION.autocast():
                loss = train_model(x, y)
            train_loss = loss.detach()
            scaler.scale(loss / grad_accum_steps).backward()
            batch = next(train_loader, None)  # None: the harness's feeder says the budget is spent
            if batch is None:
                break
            x, y, epoch = batch

        progress = min(total_training_time / TIME_BUDGET, 1.0)
        lrm = lr_multiplier(progress)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        for group in optimizers[1].param_groups:
            group["momentum"] = muon_momentum(progress)
            group["weight_decay"] = muon_weight_decay(progress)
        for opt in optimizers:
            scaler.step(opt)
        scaler.update()
        model.zero_grad(set_to_none=True)

        # Fail fast: a NaN never recovers, and a loss far above uniform (ln V) means training has diverged
        train_loss_f = train_loss.item()
        if not math.isfinite(train_loss_f) or train_loss_f > 3 * math.log(vocab_size):
            print(f"FAIL: loss is NaN/exploding at step {step} (loss {train_loss_f})", flush=True)
            sys.exit(1)

        sync()
        dt = time.time() - t0
        if feeder_clock:
            total_training_time = train_loader.training_seconds
        elif step >= untimed_steps:
            total_training_time += dt

        ema_beta = 0.9
        smooth_loss = ema_beta * smooth_loss + (1 - ema_beta) * train_loss_f
        debiased_loss = smooth_loss / (1 - ema_beta ** (step + 1))
        mfu = 100 * num_flops_per_token * TOTAL_BATCH_SIZE / dt / PRECISION.peak_flops
        remaining = max(0.0, TIME_BUDGET - total_training_time)
        print(f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased_loss:.6f} | lrm: {lrm:.2f} | "
              f"dt: {dt * 1000:.0f}ms | tok/sec: {int(TOTAL_BATCH_SIZE / dt):,} | mfu: {mfu:.1f}% | "
              f"epoch: {epoch} | remaining: {remaining:.0f}s", flush=True)

        # Python's cyclic GC causes stalls of hundreds of ms; everything long-lived exists after step 0
        if step == 0:
            gc.collect()
            gc.freeze()
            gc.disable()
        elif (step + 1) % 5000 == 0:
            gc.collect()

        step += 1
        if batch is None or (not feeder_clock and step > untimed_steps and total_training_time >= TIME_BUDGET):
            break

    train_loader.close()  # tells the feeder training is over, which stops its clock
    timed_steps = step - untimed_steps
    with PRECISION.autocast():
        val_bpb = evaluate_bpb(train_model, tokenizer, DEVICE_BATCH_SIZE)

    t_end = time.time()
    mfu_percent = 100 * num_flops_per_token * TOTAL_BATCH_SIZE * timed_steps / total_training_time / PRECISION.peak_flops
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"training_seconds: {total_training_time:.1f}")
    print(f"total_seconds:    {t_end - t_start:.1f}")
    print(f"peak_vram_mb:     {runtime.peak_memory_mb():.1f}")
    print(f"mfu_percent:      {mfu_percent:.2f}")
    print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
    print(f"num_steps:        {step}")
    print(f"num_params_M:     {num_params / 1e6:.1f}")
    print(f"depth:            {DEPTH}")
    print(f"device:           {DEVICE.type}")
    print(f"profile:          {PROFILE.name}")
    print(f"dataset:          {DATASET}")
    print(f"seed:             {SEED}")
