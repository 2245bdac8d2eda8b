"""training/train.py: the model's pieces in isolation, then whole runs of the script on the smoke profile."""

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAINING = ROOT / "training"
TRAIN = TRAINING / "train.py"

PROGRESS_LINE = re.compile(r"step \d{5} \(\d+\.\d%\) \| loss: \d+\.\d{6} \| lrm: \d\.\d\d \| dt: \d+ms \| "
                           r"tok/sec: [\d,]+ \| mfu: \d+\.\d% \| epoch: \d+ \| remaining: \d+s")
SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth", "device", "profile", "dataset", "seed"]


@pytest.fixture(scope="module")
def train():
    """train.py imported as a module: its definitions load, the training loop (script only) does not run."""
    sys.path.insert(0, str(TRAINING))
    environ = dict(os.environ)  # train.py (and torch.compile) set variables meant for a training process
    try:
        yield importlib.import_module("train")
    finally:
        sys.path.remove(str(TRAINING))
        os.environ.clear()
        os.environ.update(environ)


def tiny_model(train, window_pattern="L", sequence_len=32):
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=sequence_len, vocab_size=97, n_layer=3, n_head=2, n_embd=32,
                             window_pattern=window_pattern)
    model = train.GPT(config)
    model.init_weights()
    # init leaves the blocks as identities (zeroed output projections); give them weights so attention matters
    with torch.no_grad():
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.2)
    return model


def reference_attention(q, k, v, window):
    """Plain softmax attention on (B, T, H, D): query i sees keys i - window .. i."""
    T = q.size(1)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(q.size(-1))
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j <= window)), float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


def test_forward_returns_logits_mean_loss_or_per_token_loss(train):
    model = tiny_model(train)
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 97)
    assert logits.abs().max() < 15  # soft-capped
    per_token = model(idx, targets, reduction="none")
    assert per_token.shape == (2 * 16,)
    expected = -logits.log_softmax(-1).gather(-1, targets[..., None]).view(-1)
    torch.testing.assert_close(per_token, expected)
    torch.testing.assert_close(model(idx, targets), per_token.mean())


def test_fresh_model_predicts_nearly_uniform(train):
    config = train.GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32)
    model = train.GPT(config)
    model.init_weights()
    loss = model(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16)))
    assert abs(loss.item() - math.log(97)) < 0.01


@pytest.mark.parametrize("window", [0, 3, 8])
def test_sliding_window_attention_matches_reference(train, window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, 2, 8) for _ in range(3))
    torch.testing.assert_close(train.attention(q, k, v, window), reference_attention(q, k, v, window))


def test_sliding_window_attention_ignores_keys_outside_the_window(train):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    out = train.attention(q, k, v, window=4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :6], v2[:, :6] = torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)  # keys 0..5: out of reach from 10 on
    out2 = train.attention(q, k2, v2, window=4)
    torch.testing.assert_close(out2[:, 10:], out[:, 10:])
    assert not torch.allclose(out2[:, 9], out[:, 9])  # query 9 still sees key 5


def test_short_window_covering_the_input_equals_full_attention(train):
    # sequence_len 32: "S" layers get a 16-token window, which covers an input of 16 tokens entirely
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(tiny_model(train, "S")(idx), tiny_model(train, "L")(idx))
    # ...but not an input of 32 tokens
    idx = torch.randint(0, 97, (2, 32))
    assert not torch.allclose(tiny_model(train, "S")(idx), tiny_model(train, "L")(idx))


def test_window_pattern_cycles_over_layers_and_the_last_layer_sees_everything(train):
    config = train.GPTConfig(sequence_len=64, n_layer=6, window_pattern="SSSL")
    assert train.GPT.window_sizes(config) == [32, 32, 32, 64, 32, 64]


def test_value_embeddings_on_alternate_layers_ending_with_the_last(train):
    config = train.GPTConfig(sequence_len=32, vocab_size=97, n_layer=5, n_head=2, n_embd=32)
    model = train.GPT(config)
    assert sorted(model.value_embeds) == ["0", "2", "4"]
    assert [block.attn.ve_gate is not None for block in model.transformer.h] == [True, False, True, False, True]


@pytest.mark.parametrize("shape", [(3, 64, 16), (3, 16, 64), (2, 32, 32)])
def test_orthogonalize_pushes_singular_values_towards_one(train, shape):
    torch.manual_seed(0)
    S, rows, cols = shape
    rank = min(rows, cols)
    U, V = torch.linalg.qr(torch.randn(S, rows, rank))[0], torch.linalg.qr(torch.randn(S, cols, rank))[0]
    singular_values = torch.logspace(-2, 0, rank)  # condition number 100
    g = U @ torch.diag_embed(singular_values.expand(S, rank)) @ V.mT
    s = torch.linalg.svdvals(train.orthogonalize(g).float())
    assert s.min() > 0.7 and s.max() < 1.3


def test_optimizers_cover_every_parameter_once(train):
    model = tiny_model(train)
    optimizers = train.setup_optimizers(model)
    seen = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    muon = optimizers[1]
    assert all(p.ndim == 2 and p.shape == group["params"][0].shape for group in muon.param_groups for p in group["params"])


def test_a_few_optimizer_steps_fit_a_fixed_batch(train):
    model = tiny_model(train)
    optimizers = train.setup_optimizers(model)
    idx, targets = torch.randint(0, 97, (4, 32)), torch.randint(0, 97, (4, 32))
    first = model(idx, targets).item()
    for _ in range(20):
        model(idx, targets).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    assert model(idx, targets).item() < first - 1.0


def test_schedules_follow_the_fraction_of_budget_used(train):
    assert train.lr_multiplier(0.0) == 1.0
    assert train.lr_multiplier(1.0) == pytest.approx(train.FINAL_LR_FRAC)
    assert train.lr_multiplier(0.75) < 1.0
    assert train.muon_momentum(0.0) == pytest.approx(0.85)
    assert train.muon_momentum(1.0) == pytest.approx(0.95)
    assert train.muon_weight_decay(1.0) == 0.0


def run_train(script, cache, tmp_path, budget):
    env = {**os.environ, "AUTORESEARCH_PROFILE": "smoke", "AUTORESEARCH_TIME_BUDGET": str(budget),
           "AUTORESEARCH_CACHE": str(cache), "AUTORESEARCH_DATASET": "sotu",
           "AUTORESEARCH_RESULT_FILE": str(tmp_path / "result.json"), "PYTHONPATH": str(TRAINING)}
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_smoke_run_trains_and_reports_the_same_val_bpb_as_its_result_file(prepared_cache, tmp_path):
    # the smoke profile's whole budget: on a loaded two-core machine 4 s bought two steps, not yet below uniform
    proc = run_train(TRAIN, prepared_cache, tmp_path, budget=10)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("precision: "))
    assert re.match(r"precision: (bf16|fp32) \| compile: False \| attention: sdpa \|", header), header
    assert [line for line in lines if line.startswith("phase: ")][:2] == ["phase: warm-up", "phase: training"]
    progress = [line for line in lines if line.startswith("step ")]
    assert len(progress) >= 2 and all(PROGRESS_LINE.fullmatch(line) for line in progress), progress[:3]
    summary_start = lines.index("---")
    summary = dict(line.split(":", 1) for line in lines[summary_start + 1:])
    assert list(summary) == SUMMARY_KEYS
    summary = {key: value.strip() for key, value in summary.items()}
    assert (summary["device"], summary["profile"], summary["dataset"], summary["seed"]) == ("cpu", "smoke", "sotu", "42")
    assert int(summary["num_steps"]) == len(progress)

    result = json.loads((tmp_path / "result.json").read_text())
    assert float(summary["val_bpb"]) == pytest.approx(result["val_bpb"], abs=1e-6)
    uniform_bpb = math.log2(result["vocab_size"]) * result["tokens_evaluated"] / result["bytes_evaluated"]
    assert result["val_bpb"] < uniform_bpb


def test_diverging_run_aborts_with_a_fail_line_and_no_result(prepared_cache, tmp_path):
    source = TRAIN.read_text()
    assert "\nEMBEDDING_LR = " in source
    broken = re.sub(r"\nEMBEDDING_LR = [^ ]+", '\nEMBEDDING_LR = float("nan")', source)
    script = tmp_path / "train.py"
    script.write_text(broken)
    proc = run_train(script, prepared_cache, tmp_path, budget=4)
    assert proc.returncode == 1
    assert "FAIL: loss is NaN/exploding at step 1" in proc.stdout
    assert "val_bpb" not in proc.stdout
    assert not (tmp_path / "result.json").exists()
