"""preflight(source): a static check of train.py that fails fast, with the line at fault, on code that cannot run
or that would tamper with the frozen harness, and stays quiet on ordinary training code."""

import textwrap
from pathlib import Path

import pytest

from server.errors import WorkspaceError
from server.preflight import preflight

REPO = Path(__file__).resolve().parents[1]

# A compact but realistic train.py in the upstream style: env tweaks, a small GPT, a timed loop, the final eval.
VALID = textwrap.dedent('''\
    """Pretrain a small GPT for a fixed time budget, then report val_bpb.

    The server sets AUTORESEARCH_PROFILE and friends; this docstring may mention them.
    """
    import os
    os.environ["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"

    import math
    import time
    from dataclasses import dataclass

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, make_dataloader, evaluate_bpb

    SEED = int(os.environ.get("AUTORESEARCH_SEED", "42"))
    DEPTH = 4
    DEVICE_BATCH_SIZE = 8


    @dataclass
    class GPTConfig:
        sequence_len: int = MAX_SEQ_LEN
        vocab_size: int = 8192
        n_layer: int = DEPTH
        n_embd: int = 256


    class GPT(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

        def forward(self, idx, targets=None, reduction="mean"):
            logits = self.lm_head(F.rms_norm(self.wte(idx), (self.config.n_embd,)))
            if targets is None:
                return logits
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), reduction=reduction)


    def get_lr_multiplier(progress, warmdown=0.5):
        return 1.0 if progress < 1 - warmdown else max(0.0, (1 - progress) / warmdown)


    torch.manual_seed(SEED)
    tokenizer = Tokenizer.load()
    config = GPTConfig(vocab_size=tokenizer.get_vocab_size())
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")
    x, y, epoch = next(train_loader)

    step, total_training_time = 0, 0.0
    while True:
        t0 = time.time()
        loss = model(x, y)
        loss.backward()
        progress = min(total_training_time / TIME_BUDGET, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 3e-4 * get_lr_multiplier(progress)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        x, y, epoch = next(train_loader)
        if math.isnan(loss.item()) or loss.item() > 100:
            print(f"FAIL: loss is NaN/exploding at step {step}")
            raise SystemExit(1)
        total_training_time += time.time() - t0
        step += 1
        print(f"step {step:05d} ({100 * progress:.1f}%) | loss: {loss.item():.6f}", flush=True)
        if total_training_time >= TIME_BUDGET:
            break

    model.eval()
    val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
    print("---")
    print(f"val_bpb:          {val_bpb:.6f}")
    print(f"num_steps:        {step}")
''')


def problems(source):
    with pytest.raises(WorkspaceError) as info:
        preflight(source)
    return str(info.value)


def test_realistic_train_py_passes():
    preflight(VALID)


def test_the_shipped_train_py_passes():
    train = REPO / "training" / "train.py"
    if not train.exists():
        pytest.skip("training/train.py is not written yet")
    preflight(train.read_text())


def test_a_large_file_passes():
    preflight(VALID + "\n".join(f"def helper_{i}(x):\n    return x * {i} + len('{i}')\n" for i in range(3000)))


def test_syntax_error_reports_its_line():
    source = VALID.replace("    optimizer.step()\n", "    optimizer.step(\n", 1)
    message = problems(source)
    assert message.startswith("train.py line ")
    assert "SyntaxError" in message


def test_errors_found_only_by_the_compiler_are_caught():
    assert problems("x = 1\nreturn x\n").startswith("train.py line 2: SyntaxError")


def test_nul_byte_is_reported():
    assert problems("x = 1\0\n").startswith("train.py line")


def test_missing_metric_call():
    source = VALID.replace("val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)", "val_bpb = 0.5")
    message = problems(source)
    assert "never calls evaluate_bpb imported from prepare" in message
    assert message.startswith("train.py line 16:")  # the `from prepare import` line


def test_metric_call_through_the_module_counts():
    preflight("import prepare\nmodel = None\nprepare.evaluate_bpb(model, None, 8)\n")
    preflight("import prepare as p\np.evaluate_bpb(None, None, 8)\n")


def test_metric_call_under_another_name_counts():
    preflight("from prepare import evaluate_bpb as ev\nprint(ev(None, None, 8))\n")


def test_a_same_named_function_from_elsewhere_is_not_the_metric():
    message = problems("from mymetrics import evaluate_bpb\nevaluate_bpb(None, None, 8)\n")
    assert "never calls evaluate_bpb imported from prepare" in message
    assert "defines its own `evaluate_bpb`" in message


@pytest.mark.parametrize("redefinition, line", [
    ("def evaluate_bpb(model, tokenizer, batch_size):\n    return 0.1\n", 2),
    ("evaluate_bpb = lambda *args: 0.1\n", 2),
    ("def main():\n    def evaluate_bpb(*a):\n        return 0.1\n    return evaluate_bpb(1, 2, 3)\n", 3),
    ("def run(model, evaluate_bpb=print):\n    pass\n", 2),
])
def test_own_evaluate_bpb_is_refused(redefinition, line):
    source = "from prepare import evaluate_bpb\n" + redefinition + "evaluate_bpb(None, None, 1)\n"
    assert f"train.py line {line}: defines its own `evaluate_bpb`" in problems(source)


@pytest.mark.parametrize("mutation", [
    "prepare.EVAL_TOKENS = 1",
    "prepare.EVAL_TOKENS += 1",
    "del prepare.EVAL_TOKENS",
    "prepare.PROFILE.eval_tokens = 1",
    "setattr(prepare, 'EVAL_TOKENS', 1)",
    "delattr(prepare, 'EVAL_TOKENS')",
    "object.__setattr__(prepare, 'EVAL_TOKENS', 1)",
    "prepare.__dict__['EVAL_TOKENS'] = 1",
    "vars(prepare).update(EVAL_TOKENS=1)",
])
def test_changing_the_prepare_module_is_refused(mutation):
    source = f"import prepare\nx = 1\n{mutation}\nprepare.evaluate_bpb(None, None, 1)\n"
    message = problems(source)
    assert message.startswith("train.py line 3: modifies")
    assert "the harness is frozen" in message


def test_changing_the_module_under_an_alias_is_refused():
    source = "import prepare as p\np.EVAL_TOKENS = 1\np.evaluate_bpb(None, None, 1)\n"
    assert problems(source).startswith("train.py line 2: modifies `p.EVAL_TOKENS`")


@pytest.mark.parametrize("mutation", [
    "Tokenizer.encode = lambda self, text: []",
    "setattr(Tokenizer, 'encode', None)",
    "evaluate_bpb.__defaults__ = (1,)",
])
def test_changing_objects_imported_from_prepare_is_refused(mutation):
    source = f"from prepare import Tokenizer, evaluate_bpb\n{mutation}\nevaluate_bpb(None, None, 1)\n"
    assert problems(source).startswith("train.py line 2: modifies")


@pytest.mark.parametrize("rebinding", [
    "MAX_SEQ_LEN = 1",
    "MAX_SEQ_LEN += 1",
    "for MAX_SEQ_LEN in range(3): pass",
    "from config import MAX_SEQ_LEN",
    "def setup():\n    global MAX_SEQ_LEN\n    MAX_SEQ_LEN = 1",
    "if True:\n    with open('x') as MAX_SEQ_LEN: pass",
    "print((MAX_SEQ_LEN := 1))",
])
def test_rebinding_an_imported_name_is_refused(rebinding):
    source = f"from prepare import MAX_SEQ_LEN, evaluate_bpb\n{rebinding}\nevaluate_bpb(None, None, 1)\n"
    assert "rebinds `MAX_SEQ_LEN`, which comes from prepare" in problems(source)


def test_rebinding_the_module_name_is_refused():
    assert "rebinds `prepare`" in problems("import prepare\nprepare = None\nprepare.evaluate_bpb(1, 2, 3)\n")


@pytest.mark.parametrize("local_use", [
    "def f(MAX_SEQ_LEN=4):\n    return MAX_SEQ_LEN",
    "def f():\n    MAX_SEQ_LEN = 512\n    return MAX_SEQ_LEN",
    "class C:\n    MAX_SEQ_LEN = 512",
    "lengths = [MAX_SEQ_LEN for MAX_SEQ_LEN in range(3)]",
    "seq_len = MAX_SEQ_LEN // 2",
])
def test_local_names_and_reads_are_fine(local_use):
    preflight(f"from prepare import MAX_SEQ_LEN, evaluate_bpb\n{local_use}\nevaluate_bpb(None, None, 1)\n")


def test_star_import_is_refused():
    assert "import *" in problems("from prepare import *\nevaluate_bpb(None, None, 1)\n")


@pytest.mark.parametrize("word", ["AUTORESEARCH_RESULT_FILE", "AUTORESEARCH_PROFILE", "AUTORESEARCH_TIME_BUDGET",
                                  "AUTORESEARCH_DATASET", "result.json"])
def test_server_settings_may_not_be_mentioned(word):
    source = f"import os\nfrom prepare import evaluate_bpb\nos.environ['{word}'] = 'x'\nevaluate_bpb(1, 2, 3)\n"
    assert problems(source).startswith(f"train.py line 3: mentions {word}")


def test_server_settings_inside_f_strings_are_caught():
    source = 'from prepare import evaluate_bpb\nname = "x"\np = f"/tmp/{name}/result.json"\nevaluate_bpb(1, 2, 3)\n'
    assert problems(source).startswith("train.py line 3: mentions result.json")


@pytest.mark.parametrize("write", [
    "open('prepare.py', 'w').write('')",
    "open('training/prepare.py', mode='a')",
    "open(os.path.join(os.path.dirname(__file__), 'prepare.py'), 'r+')",
    "Path(__file__).with_name('prepare.py').write_text('')",
    "Path('prepare.py').open('wb')",
    "os.remove('prepare.py')",
    "os.replace('other.py', 'prepare.py')",
    "shutil.copy('other.py', 'prepare.py')",
    "os.open('prepare.py', os.O_WRONLY)",
    "open(prepare.__file__, 'w')",
])
def test_writing_prepare_py_is_refused(write):
    source = f"import os, shutil\nimport prepare\nfrom pathlib import Path\n{write}\nprepare.evaluate_bpb(1, 2, 3)\n"
    assert problems(source).startswith("train.py line 4: writes to prepare.py")


def test_writing_prepare_py_through_a_variable_is_refused():
    source = ("from pathlib import Path\nfrom prepare import evaluate_bpb\nhere = Path(__file__).parent\n"
              "harness = here / 'prepare.py'\ntarget = harness\ntarget.write_text('')\nevaluate_bpb(1, 2, 3)\n")
    assert problems(source).startswith("train.py line 6: writes to prepare.py")


@pytest.mark.parametrize("harmless", [
    "print(open('prepare.py').read()[:10])",
    "shutil.copy('prepare.py', '/tmp/prepare_backup.py')",
    "note = 'see prepare.py'\nPath('notes.txt').write_text(note)",
    "open('log.txt', 'w').write('prepare.py is frozen')",
])
def test_reading_or_mentioning_prepare_py_is_fine(harmless):
    preflight(f"import shutil\nfrom pathlib import Path\nfrom prepare import evaluate_bpb\n{harmless}\n"
              "evaluate_bpb(1, 2, 3)\n")


def test_every_problem_is_reported_in_line_order():
    source = "import prepare\nprepare.X = 1\nimport os\nos.environ['AUTORESEARCH_PROFILE'] = 'gpu'\n"
    lines = problems(source).splitlines()
    assert [line.split(":")[0] for line in lines] == ["train.py line 1", "train.py line 2", "train.py line 4"]
