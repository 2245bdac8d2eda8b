"""The frozen harness (training/prepare.py) and the prepare command (training/prepare_data.py): tokenizer, on-disk
format, packing, the metric, downloads, errors and the CLI."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))
import prepare  # noqa: E402
import prepare_data  # noqa: E402

SMOKE = prepare.PROFILES["smoke"]


@pytest.fixture
def smoke(monkeypatch):
    """Run evaluate_bpb under the smoke profile's constants, whatever profile the test process resolved."""
    monkeypatch.setattr(prepare, "PROFILE", SMOKE)
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", SMOKE.max_seq_len)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", SMOKE.eval_tokens)
    monkeypatch.delenv("AUTORESEARCH_RESULT_FILE", raising=False)


@pytest.fixture(scope="module")
def sotu(prepared_cache):
    return prepare.Tokenizer.load("sotu", cache=prepared_cache, vocab_size=SMOKE.vocab_size)


def run_cli(*args, cache, **env):
    return subprocess.run([sys.executable, str(ROOT / "training" / "prepare.py"), *args],
                          env={**os.environ, "AUTORESEARCH_CACHE": str(cache), **env},
                          capture_output=True, text=True, timeout=120)


# --- tokenizer ---------------------------------------------------------------------------------------------------

def test_tokenizer_round_trips_text_including_unicode(sotu):
    texts = ["The State of the Union is strong.", "naïve café – “quotes” – 你好世界 – emoji 🙂🇺🇸", "tabs\tand\n\nnewlines  ",
             ""]
    for text in texts:
        assert sotu.decode(sotu.encode(text)) == text
    assert [sotu.decode(ids) for ids in sotu.encode(texts)] == texts


def test_prepend_puts_bos_first_and_vocab_is_the_profiles(sotu):
    bos = sotu.get_bos_token_id()
    assert sotu.get_vocab_size() == SMOKE.vocab_size
    assert sotu.encode("hello", prepend=bos)[0] == bos
    assert sotu.encode("hello", prepend=prepare.BOS_TOKEN) == [bos] + sotu.encode("hello")
    assert all(row[0] == bos for row in sotu.encode(["a", "b c"], prepend=bos))


def test_token_byte_lengths_sum_to_the_utf8_size_and_specials_count_zero(sotu):
    text = "Mr. Speaker — 1790 to 2026: ünïcödé, 日本語, 🙂"
    assert sotu.token_bytes[sotu.encode(text)].sum() == len(text.encode("utf-8"))
    for special in prepare.SPECIAL_TOKENS:
        assert sotu.token_bytes[sotu.enc.encode_single_token(special)] == 0


# --- on-disk format ----------------------------------------------------------------------------------------------

def test_prepared_sotu_holds_out_the_newest_speeches_as_val(sotu):
    meta = json.loads((sotu.data_dir / "tokens_v8192" / "meta.json").read_text())
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["docs"] + val["docs"] == 249
    assert val["tokens"] >= prepare.PROFILES["cpu"].eval_tokens  # the cpu eval never repeats a token
    tokens, offsets = prepare.load_split(sotu, "val")
    last = sotu.decode(tokens[offsets[-2]:offsets[-1]])
    assert "Mr. Speaker" in last or "Thank you" in last
    newest = Path(__import__("sotu").__file__).parent / "data" / "speeches" / "2026-Trump-1.txt"
    assert last == newest.read_text(encoding="utf-8")
    assert meta["val_fingerprint"] == hashlib.sha256((sotu.data_dir / "tokens_v8192" / "val.bin").read_bytes()).hexdigest()


# --- packing -----------------------------------------------------------------------------------------------------

def synthetic_corpus(seed=0, n_docs=300, max_len=700):
    """Tokens numbered 1..N, so every token's value is its position: a row's provenance can be read off it."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len, n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.int64)
    return tokens, offsets


def segments(row, bos=0):
    starts = np.flatnonzero(row == bos)
    return [row[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(row)])]


def test_rows_start_with_bos_and_every_segment_is_a_contiguous_slice_of_one_document():
    tokens, offsets = synthetic_corpus()
    T = 128
    rows = next(prepare.packed_batches(tokens, offsets, 64, T, bos=0, seed=1))[0]
    assert rows.shape == (64, T + 1)
    assert (rows[:, 0] == 0).all()
    for row in rows:
        for seg in segments(row):
            if len(seg):
                assert (np.diff(seg) == 1).all(), "a segment is not contiguous"
                first_doc = np.searchsorted(offsets, seg[0] - 1, side="right") - 1
                last_doc = np.searchsorted(offsets, seg[-1] - 1, side="right") - 1
                assert first_doc == last_doc, "a segment crosses a document boundary"


def test_one_epoch_uses_every_token_exactly_once_without_padding():
    tokens, offsets = synthetic_corpus(n_docs=200)
    T = 96
    seen = []
    for rows, epoch in prepare.packed_batches(tokens, offsets, 1, T, bos=0, seed=3):
        if epoch > 1:
            break
        seen.extend(rows[0][rows[0] != 0].tolist())
    # the row during which epoch 2 began is not counted: at most one row of tokens is missing
    assert len(seen) == len(set(seen)), "a token was used twice within an epoch"
    assert len(tokens) - T <= len(seen) <= len(tokens)


def test_long_documents_become_full_rows_not_crops():
    offsets = np.array([0, 10_000], dtype=np.int64)  # one document, 10k tokens, context 100
    tokens = np.arange(1, 10_001, dtype=np.int64)
    rows = next(prepare.packed_batches(tokens, offsets, 100, 100, bos=0, seed=0))[0]
    assert (rows != 0).sum() == 10_000  # 100 rows of BOS + 100 tokens hold the whole document


def test_packing_is_deterministic_per_seed_and_independent_of_batch_size():
    tokens, offsets = synthetic_corpus()

    def rows(B, n_batches, seed):
        batches = prepare.packed_batches(tokens, offsets, B, 64, bos=0, seed=seed)
        return np.concatenate([next(batches)[0] for _ in range(n_batches)])

    assert np.array_equal(rows(8, 4, seed=5), rows(8, 4, seed=5))
    assert np.array_equal(rows(8, 4, seed=5), rows(16, 2, seed=5))  # same rows whatever the batch size
    assert not np.array_equal(rows(8, 4, seed=5), rows(8, 4, seed=6))


def test_dataloader_yields_shifted_int64_batches_of_real_tokens(sotu):
    bos = sotu.get_bos_token_id()
    loader = prepare.make_dataloader(sotu, 4, 64, "train", seed=1)
    again = prepare.make_dataloader(sotu, 4, 64, "train", seed=1)
    for _ in range(3):
        x, y, epoch = next(loader)
        x2, y2, _ = next(again)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 64)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (x[:, 0] == bos).all()
        assert epoch == 1
        assert torch.equal(x, x2) and torch.equal(y, y2)
        specials = torch.tensor(sotu.token_bytes == 0)[x]
        assert (x[specials] == bos).all(), "only BOS may be a special token: no padding"


def test_val_stream_ignores_the_seed(sotu):
    a = next(prepare.make_dataloader(sotu, 2, 32, "val", seed=1))[0]
    b = next(prepare.make_dataloader(sotu, 2, 32, "val", seed=2))[0]
    assert torch.equal(a, b)


# --- the metric --------------------------------------------------------------------------------------------------

class Uniform(torch.nn.Module):
    """Predicts uniform logits over the vocab: the per-token loss is exactly ln(V)."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab_size) + self.dummy


def expected_uniform_bpb(tok):
    """The analytic value, counted independently: ln(V) nats for each non-special target over its bytes.
    (evaluate_bpb computes the loss in float32, hence the 1e-6 tolerance below.)"""
    loader = prepare.make_dataloader(tok, 1, SMOKE.max_seq_len, "val")
    n_tokens = n_bytes = 0
    for _ in range(SMOKE.eval_tokens // SMOKE.max_seq_len):  # the smoke eval's rows: the val split is larger
        for t in next(loader)[1].reshape(-1).tolist():
            if t != tok.get_bos_token_id():
                n_tokens += 1
                n_bytes += len(tok.enc.decode_single_token_bytes(t))
    return math.log(tok.get_vocab_size()) * n_tokens / (math.log(2) * n_bytes), n_tokens, n_bytes


def test_evaluate_bpb_of_uniform_logits_is_the_analytic_value(sotu, smoke):
    expected, _, _ = expected_uniform_bpb(sotu)
    model = Uniform(sotu.get_vocab_size())
    model.train()
    assert prepare.evaluate_bpb(model, sotu, 8) == pytest.approx(expected, rel=1e-6)
    assert model.training, "evaluate_bpb must restore the model's mode"
    # the batch size does not change the value
    assert prepare.evaluate_bpb(Uniform(sotu.get_vocab_size()), sotu, 16) == pytest.approx(expected, rel=1e-6)


class PeeksAhead(Uniform):
    """Puts all its mass on the next input token: what a model with a broken causal mask does."""

    def forward(self, x):
        return 30.0 * F.one_hot(torch.roll(x, -1, dims=1), self.vocab_size).float() + self.dummy


class ReturnsItsOwnLoss(Uniform):
    def forward(self, x, targets=None, reduction="mean"):
        return torch.zeros((), requires_grad=True)


def test_evaluate_bpb_refuses_a_model_that_sees_the_future(sotu, smoke):
    with pytest.raises(prepare.PrepareError, match="not causal"):
        prepare.evaluate_bpb(PeeksAhead(sotu.get_vocab_size()), sotu, 8)


def test_evaluate_bpb_computes_the_loss_itself(sotu, smoke):
    with pytest.raises(prepare.PrepareError, match="must return the logits"):
        prepare.evaluate_bpb(ReturnsItsOwnLoss(sotu.get_vocab_size()), sotu, 8)


def test_evaluate_bpb_writes_a_consistent_result_file(sotu, smoke, tmp_path, monkeypatch):
    result_file = tmp_path / "runs" / "r0001" / "result.json"
    monkeypatch.setenv("AUTORESEARCH_RESULT_FILE", str(result_file))
    bpb = prepare.evaluate_bpb(Uniform(sotu.get_vocab_size()), sotu, 8)
    result = json.loads(result_file.read_text())
    expected, n_tokens, n_bytes = expected_uniform_bpb(sotu)
    val_bin = sotu.data_dir / "tokens_v8192" / "val.bin"
    assert result["val_bpb"] == bpb == pytest.approx(expected, rel=1e-6)
    assert result["tokens_evaluated"] == n_tokens and result["bytes_evaluated"] == n_bytes
    assert result["rows_evaluated"] == SMOKE.eval_tokens // SMOKE.max_seq_len
    assert result["val_fingerprint"] == hashlib.sha256(val_bin.read_bytes()).hexdigest()
    assert {k: result[k] for k in ("profile", "dataset", "max_seq_len", "eval_tokens", "vocab_size")} == {
        "profile": "smoke", "dataset": "sotu", "max_seq_len": 128, "eval_tokens": 2**14, "vocab_size": 8192}
    assert result["eval_seconds"] >= 0
    assert list(result_file.parent.iterdir()) == [result_file], "no temporary file may be left behind"


class Bigram(torch.nn.Module):
    """A small causal model with real, input-dependent logits; records the batch shapes it is called with."""

    def __init__(self, vocab_size, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(vocab_size, dim), torch.nn.Linear(dim, vocab_size)
        self.shapes = set()

    def forward(self, x):
        self.shapes.add(tuple(x.shape))
        return self.head(self.embed(x))


def test_the_rows_scored_do_not_depend_on_the_batch_size(sotu, smoke, tmp_path, monkeypatch, capsys):
    results = {}
    for batch_size in (12, 6):  # neither divides the smoke eval's 128 rows: the last batch is padded
        monkeypatch.setenv("AUTORESEARCH_RESULT_FILE", str(tmp_path / f"b{batch_size}.json"))
        model = Bigram(sotu.get_vocab_size())
        bpb = prepare.evaluate_bpb(model, sotu, batch_size)
        results[batch_size] = json.loads((tmp_path / f"b{batch_size}.json").read_text())
        assert results[batch_size]["val_bpb"] == bpb
        assert model.shapes == {(batch_size, SMOKE.max_seq_len)}, "every batch, the padded last one too, is full"
    rows, tokens, nbytes = prepare.expected_eval(sotu, SMOKE.max_seq_len, SMOKE.eval_tokens)
    assert rows == SMOKE.eval_tokens // SMOKE.max_seq_len == 128
    for r in results.values():
        assert (r["rows_evaluated"], r["tokens_evaluated"], r["bytes_evaluated"]) == (rows, tokens, nbytes)
    assert results[12]["val_bpb"] == pytest.approx(results[6]["val_bpb"], rel=1e-9)
    out = capsys.readouterr().out.splitlines()
    assert out.count("phase: evaluating") == 2
    progress = [line for line in out if line.startswith("eval: ")]
    assert progress[0] == "eval: 0/128 rows" and progress[-1] == "eval: 128/128 rows"
    assert len(progress) <= 2 * (prepare.EVAL_PROGRESS_LINES + 2)
    done = [int(line.split()[1].split("/")[0]) for line in progress]
    assert done.count(0) == 2 and all(b > a for a, b in zip(done, done[1:]) if b), "progress only moves forward"


def test_a_val_split_shorter_than_one_row_is_refused(sotu, smoke, monkeypatch):
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", 10**7)
    with pytest.raises(prepare.PrepareError, match="shorter than one row"):
        prepare.evaluate_bpb(Uniform(sotu.get_vocab_size()), sotu, 8)


# --- configuration and errors ------------------------------------------------------------------------------------

def test_profiles_and_the_budget_override():
    assert prepare.PROFILES["gpu"] == prepare.Profile("gpu", 2048, 300, 40 * 2**19, 8192, 953 * 2**19)
    budget = lambda value: prepare.resolve_settings({"AUTORESEARCH_TIME_BUDGET": value}, profile="smoke").time_budget
    assert budget("4.5") == 4.5 and budget("") == 10 and budget("3") == 3
    with pytest.raises(prepare.PrepareError, match="may only shorten"):
        budget("600")
    with pytest.raises(prepare.PrepareError, match="not a positive number"):
        budget("soon")


def test_unknown_profile_names_the_valid_choices(tmp_path):
    with pytest.raises(prepare.PrepareError, match="unknown profile 'huge': choose one of gpu, small, cpu, smoke"):
        prepare.resolve_settings({}, profile="huge")
    proc = run_cli("--describe", "--profile", "huge", cache=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "unknown profile 'huge'" in proc.stderr and "gpu, small, cpu, smoke" in proc.stderr
    # train.py sees the same error at import
    proc = subprocess.run([sys.executable, "-c", "import prepare"], cwd=ROOT / "training", capture_output=True,
                          text=True, env={**os.environ, "AUTORESEARCH_PROFILE": "huge"}, timeout=60)
    assert proc.returncode != 0 and "unknown profile 'huge'" in proc.stderr


def test_unknown_dataset_names_the_valid_choices():
    with pytest.raises(prepare.PrepareError, match="unknown dataset 'wikipedia': choose one of sotu, climbmix, "
                                                   "tinystories, or give the path of a folder"):
        prepare.dataset_name("wikipedia")


def test_missing_dataset_says_how_to_prepare_it(tmp_path, smoke):
    with pytest.raises(prepare.PrepareError) as e:
        prepare.Tokenizer.load("sotu", cache=tmp_path / "empty")
    assert "dataset sotu is not prepared: run `autoresearch-mcp prepare --dataset sotu --profile smoke`" in str(e.value)
    with pytest.raises(prepare.PrepareError, match="does not exist"):
        prepare_data.prepare_dataset(str(tmp_path / "no-such-folder"), tmp_path / "cache")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(prepare.PrepareError, match="has no non-empty .txt, .jsonl or .parquet files"):
        prepare_data.prepare_dataset(str(tmp_path / "empty-folder"), tmp_path / "cache")


@pytest.fixture
def corruptible(prepared_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(prepared_cache / "sotu", cache / "sotu")
    return cache


def test_truncated_token_file_is_reported_as_corrupt(corruptible, smoke):
    val_bin = corruptible / "sotu" / "tokens_v8192" / "val.bin"
    val_bin.write_bytes(val_bin.read_bytes()[:1001])
    tok = prepare.Tokenizer.load("sotu", cache=corruptible)
    with pytest.raises(prepare.PrepareError) as e:
        next(prepare.make_dataloader(tok, 2, 32, "val"))
    assert "corrupt" in str(e.value) and "val.bin" in str(e.value)
    assert "autoresearch-mcp prepare --dataset sotu --profile smoke --force" in str(e.value)


def test_bad_tokenizer_pickle_is_reported_and_force_repairs_it(corruptible):
    (corruptible / "sotu" / "tokenizer_v8192" / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(prepare.PrepareError, match="corrupt cache .*cannot load the tokenizer.*--force"):
        prepare.Tokenizer.load("sotu", cache=corruptible)
    prepare_data.prepare_dataset("sotu", corruptible, force=True)
    assert prepare.Tokenizer.load("sotu", cache=corruptible).decode([72, 105]) == "Hi"


def test_offline_download_fails_at_once_naming_the_repo_url_and_the_alternatives(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(prepare_data, "HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(prepare_data.OfflineError) as e:
        prepare_data.prepare_dataset("climbmix", tmp_path, num_shards=1)
    message = str(e.value)
    assert "'climbmix'" in message and "http://127.0.0.1:9/datasets/karpathy/climbmix-400b-shuffle" in message
    assert "--dataset sotu" in message and "--dataset /path/to/folder" in message
    assert "Retry" not in capfd.readouterr().err, "an unreachable host must not be retried"
    assert not list(tmp_path.rglob("*.parquet")), "nothing half-written may look like data"


def test_the_cli_names_the_offline_alternatives_in_one_line(tmp_path):
    proc = run_cli("--dataset", "tinystories", "--profile", "smoke", cache=tmp_path, HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: cannot download dataset 'tinystories': http://127.0.0.1:9/datasets/")
    assert "--dataset sotu" in error


def test_downloaded_shards_already_in_the_cache_need_no_network(tmp_path, monkeypatch):
    """climbmix's code path on local data: shards present in raw/ are used as they are, never fetched again."""
    monkeypatch.setattr(prepare_data, "HF_ENDPOINT", "http://127.0.0.1:9")
    raw = tmp_path / "climbmix" / "raw"
    raw.mkdir(parents=True)
    words = "data flows through the shards of a mixture of web text and code".split()
    rng = np.random.default_rng(1)
    texts = lambda n: [" ".join(rng.choice(words, int(rng.integers(50, 300)))) for _ in range(n)]
    pq.write_table(pa.table({"text": texts(60)}), raw / "shard_00000.parquet")
    pq.write_table(pa.table({"text": texts(10)}), raw / f"shard_{prepare_data.CLIMBMIX_VAL_SHARD:05d}.parquet")
    prepare_data.prepare_dataset("climbmix", tmp_path, num_shards=1)
    tok = prepare.Tokenizer.load("climbmix", cache=tmp_path)
    meta = json.loads((tmp_path / "climbmix" / "tokens_v8192" / "meta.json").read_text())
    assert meta["splits"]["train"]["docs"] == 60 and meta["splits"]["val"]["docs"] == 10
    assert tok.decode(prepare.load_split(tok, "val")[0][:5]).split()[0] in words


# --- local folders and the CLI -----------------------------------------------------------------------------------

def test_local_folder_of_txt_jsonl_and_parquet(tmp_path, smoke):
    folder = tmp_path / "my data"
    folder.mkdir()
    words = "the quick brown fox jumps over a lazy dog while birds sing".split()
    rng = np.random.default_rng(0)
    story = lambda i: f"Story {i}: " + " ".join(rng.choice(words, int(rng.integers(20, 400))))
    (folder / "a.txt").write_text(story(0))
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": story(i)}) for i in range(1, 40)) + "\n")
    pq.write_table(pa.table({"text": [story(i) for i in range(40, 43)]}), folder / "c.parquet")
    data_dir = prepare_data.prepare_dataset(str(folder), tmp_path / "cache")
    assert data_dir.name.startswith("local-my-data-") and len(data_dir.name) == len("local-my-data-") + 8
    tok = prepare.Tokenizer.load(str(folder), cache=tmp_path / "cache")
    meta = json.loads((data_dir / "tokens_v8192" / "meta.json").read_text())
    assert meta["splits"]["train"]["docs"] == 40 and meta["splits"]["val"]["docs"] == 3  # the last file is val
    tokens, offsets = prepare.load_split(tok, "val")
    assert tok.decode(tokens[:offsets[1]]).startswith("Story 40: ")
    x, y, _ = next(prepare.make_dataloader(tok, 2, 64, "train"))
    assert (x[:, 0] == tok.get_bos_token_id()).all()
    # once prepared, its cache name names it too: what the server gives a run's processes (never the folder)
    assert prepare.dataset_name(data_dir.name) == data_dir.name
    named = prepare.Tokenizer.load(data_dir.name, cache=tmp_path / "cache")
    assert named.data_dir == tok.data_dir and named.encode("Story 1") == tok.encode("Story 1")
    with pytest.raises(prepare.PrepareError, match="prepare it from the folder itself"):
        prepare_data.prepare_dataset(data_dir.name, tmp_path / "cache")


def test_parquet_row_ranges_split_like_the_tinystories_card(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_data, "PARQUET_BATCH_ROWS", 7)  # ranges straddle batch boundaries
    path = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"text": [f"story {i}" for i in range(50)]}), path)
    rows = lambda *bounds: [t for batch in prepare_data.parquet_texts(path, *bounds) for t in batch]
    assert rows(10, 20) == [f"story {i}" for i in range(10, 20)]
    assert rows(20) == [f"story {i}" for i in range(20, 50)]


def test_describe_reports_settings_readiness_and_the_val_fingerprint(prepared_cache, tmp_path):
    proc = run_cli("--describe", "--dataset", "sotu", "--profile", "smoke", cache=prepared_cache)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    meta = json.loads((prepared_cache / "sotu" / "tokens_v8192" / "meta.json").read_text())
    assert info["profile"] == {"name": "smoke", "max_seq_len": 128, "time_budget": 10, "eval_tokens": 2**14,
                               "vocab_size": 8192, "tokens_per_budget": SMOKE.tokens_per_budget}
    assert info["ready"] is True and Path(info["ready_marker"]).exists()
    assert info["val_fingerprint"] == meta["val_fingerprint"]
    assert info["dataset"] == "sotu" and info["device"] in ("cuda", "mps", "cpu")
    empty = json.loads(run_cli("--describe", "--dataset", "sotu", cache=tmp_path).stdout)
    assert empty["ready"] is False and empty["val_fingerprint"] is None and not Path(empty["ready_marker"]).exists()


def test_settings_come_from_flags_then_environment_then_defaults(tmp_path):
    env = {"AUTORESEARCH_PROFILE": "cpu", "AUTORESEARCH_CACHE": str(tmp_path), "AUTORESEARCH_SEED": "7",
           "AUTORESEARCH_DATASET": "tinystories", "AUTORESEARCH_TIME_BUDGET": "5"}
    s = prepare.resolve_settings(env)
    assert (s.profile.name, s.seed, s.cache_dir, s.dataset, s.time_budget) == ("cpu", 7, tmp_path, "tinystories", 5)
    s = prepare.resolve_settings(env, profile="smoke", dataset="sotu")
    assert (s.profile, s.dataset_source, s.dataset) == (SMOKE, "sotu", "sotu")
    s = prepare.resolve_settings({"AUTORESEARCH_PROFILE": "gpu", "AUTORESEARCH_CACHE": str(tmp_path)})
    assert s.dataset == "sotu" and s.seed == 42 and s.time_budget == 300  # climbmix only once it is prepared
    with pytest.raises(prepare.PrepareError, match="AUTORESEARCH_SEED='x' is not an integer"):
        prepare.resolve_settings({"AUTORESEARCH_SEED": "x"})


def test_describe_announces_what_the_evaluation_will_score_and_the_epochs(prepared_cache, sotu):
    info = json.loads(run_cli("--describe", "--dataset", "sotu", "--profile", "smoke", cache=prepared_cache).stdout)
    rows, tokens, nbytes = prepare.expected_eval(sotu, SMOKE.max_seq_len, SMOKE.eval_tokens)
    assert (info["eval_rows"], info["eval_tokens_scored"], info["eval_bytes_scored"]) == (rows, tokens, nbytes)
    train_tokens = len(prepare.load_split(sotu, "train")[0])
    assert info["train_tokens"] == train_tokens
    assert info["epochs_per_budget"] == round(SMOKE.tokens_per_budget / train_tokens, 2)
    gpu = json.loads(run_cli("--describe", "--dataset", "sotu", "--profile", "gpu", cache=prepared_cache).stdout)
    assert gpu["epochs_per_budget"] > 100  # 953 steps of 2^19 tokens over sotu's ~2M
    assert gpu["eval_rows"] == len(prepare.load_split(sotu, "val")[0]) // 2048  # the whole val split, once


def test_prepare_warns_when_a_budget_would_read_the_training_split_many_times(prepared_cache):
    proc = run_cli("--dataset", "sotu", "--profile", "gpu", cache=prepared_cache)
    assert proc.returncode == 0, proc.stderr
    warning = proc.stderr.strip().splitlines()[-1]
    assert warning.startswith("warning: one gpu budget reads ~") and "epochs of sotu's 2.0M training tokens" in warning
    assert "memorisation" in warning and "climbmix" in warning
    cpu = run_cli("--dataset", "sotu", "--profile", "cpu", cache=prepared_cache).stderr.strip().splitlines()[-1]
    assert cpu.startswith("one cpu budget reads ~1.") and "warning" not in cpu


def test_the_gpu_profile_falls_back_to_sotu_when_climbmix_cannot_download(prepared_cache):
    proc = run_cli("--profile", "gpu", cache=prepared_cache, HF_ENDPOINT="http://127.0.0.1:9")
    assert proc.returncode == 0, proc.stderr
    assert "climbmix is the gpu profile's default when it downloads; preparing sotu" in proc.stderr
    assert "sotu: already prepared" in proc.stderr and "Traceback" not in proc.stderr
