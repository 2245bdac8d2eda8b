"""
The harness's feeder: the one source of training batches, and the owner of the run's clock.

It runs as its own trusted process beside the trainer (train.py, sandboxed), reads only the TRAIN split through
prepare's loader, and serves batches on request. It decides what the run is credited with:
  - a fixed warm-up allowance of tokens per profile (for compilation and allocator warm-up) whose time does not count;
  - then the clock runs, in wall time, in this process: sleeping, slowing a clock or counting steps differently in
    the trainer changes nothing;
  - when the budget is spent, the next request gets a clean end-of-budget answer. Nothing more is ever served, so
    training past the budget is impossible for a trainer whose only data is what the feeder serves (the sandbox
    hides the cache), not merely detected afterwards.
Its figures (training_seconds, tokens, warm-up tokens, batches) are the run's official ones. It reports them in a
status file the server reads (rewritten atomically: phase waiting|warm-up|training|ended) and, when serving ends,
as one JSON line on stdout.

Transport, designed for speed: a Unix socket pair carries the control messages (a 1-byte request, a 32-byte reply)
and a shared-memory ring (a sealed memfd, mapped read-only by the trainer) carries the tokens, as uint16. A slot is
written only when its batch is served, so the trainer never sees a batch it has not been credited with.

Usage (the server starts it; AUTORESEARCH_* in the environment as for the trainer):
    python training/feeder.py --fd N [--status FILE] [--warmup-tokens N] [--warmup-limit SECONDS]
The trainer's side (train.py):
    from feeder import feeder_dataloader
    train_loader = feeder_dataloader(tokenizer, B, T, "train", device=device)  # make_dataloader's arguments
    x, y, epoch = next(train_loader)       # StopIteration once the budget is spent: `next(train_loader, None)`
    train_loader.progress                  # fraction of the budget used (0 in warm-up), for LR schedules
Without AUTORESEARCH_FEEDER_FD (a human running train.py by hand), the client starts a feeder of its own.
"""

import json
import mmap
import os
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FD_ENV = "AUTORESEARCH_FEEDER_FD"

# Warm-up allowance per profile, in tokens: ten steps of the default train.py's batch on the GPU profiles
# (torch.compile, autotuning and cuDNN's benchmarks spread over the first steps, as upstream's ten untimed steps),
# two on smoke, and on cpu one step and one batch. On a CPU inductor compiles everything in step 0 and does not
# autotune: measured on a 2-core EPYC, step 1 took 1.62 s against 1.56 s steady, so each further untimed step only
# added ~1.6 s to every experiment. The one batch: train.py asks for the next step's first batch before its
# optimizer step, and in step 0 that step compiles the optimizer, which the clock must not count. A train.py with a
# bigger batch gets fewer warm-up steps; the allowance is the same for every experiment, and a direct
# `python training/train.py` run leaves the same whole steps untimed (train.py reads this table).
WARMUP_TOKENS = {"gpu": 10 * 2**19, "small": 10 * 2**15, "cpu": 2**13 + 2**11, "smoke": 2 * 2**11}
# The warm-up cannot be stretched to train for free on its tokens: after this long the clock starts anyway,
# counted from this instant. Generous (twice the budget), so a compile on a busy machine loses nothing: the cpu
# profile's compile took over 300 s on 2 cores with a load average of 10. What a trainer could gain by stretching
# it is bounded by the few warm-up tokens, repeated.
WARMUP_LIMIT_SECONDS = {"gpu": 600, "small": 600, "cpu": 600, "smoke": 120}
MAX_BATCH_TOKENS = 2**24    # B * (T + 1) per batch at most (32 MiB a slot): a trainer cannot make us allocate more
SLOTS = 2                   # ring slots; a slot is rewritten only after the trainer copied it out and asked again
PREFETCH = 4                # packed batches the feeder keeps ready ahead of requests (not yet served)
STATUS_SECONDS = 0.5        # the status file is rewritten at least this often while serving, and at every phase
MAX_HELLO_BYTES = 4096

# Control messages. Trainer -> feeder: 1 byte. Feeder -> trainer: a fixed 32-byte reply.
NEXT, QUIT = b"n", b"q"
WARMUP_BATCH, TRAIN_BATCH, END = 0, 1, 2
REPLY = struct.Struct("<iiqdq")  # kind, slot, epoch, training seconds so far, training tokens served so far
TOKEN_DTYPE = np.uint16          # prepare's on-disk token type: vocab sizes up to 65536


class FeedError(Exception):
    """The feed was refused or broke; the message says why."""


# ---------------------------------------------------------------------------
# Small helpers shared by both sides
# ---------------------------------------------------------------------------

def _send_json(sock, obj, fds=()):
    data = json.dumps(obj).encode()
    message = struct.pack("<I", len(data)) + data
    if fds:
        socket.send_fds(sock, [message], list(fds))
    else:
        sock.sendall(message)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _recv_json(sock, with_fds=False):
    """One length-prefixed JSON message (and the fds sent with its first bytes)."""
    fds = []
    if with_fds:
        head, fds, _, _ = socket.recv_fds(sock, 4, 4)
        if not head:
            raise EOFError
        head += _recv_exact(sock, 4 - len(head))
    else:
        head = _recv_exact(sock, 4)
    (size,) = struct.unpack("<I", head)
    if size > MAX_HELLO_BYTES:
        raise FeedError(f"message of {size} bytes is too long")
    return json.loads(_recv_exact(sock, size)), fds


def _shared_memory(nbytes):
    """A file descriptor of nbytes of shared memory: a sealed memfd on Linux (size fixed, so the trainer cannot
    shrink it under the feeder), an unlinked temporary file elsewhere."""
    if hasattr(os, "memfd_create"):
        import fcntl
        fd = os.memfd_create("autoresearch-feed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        return fd
    import tempfile
    with tempfile.TemporaryFile() as f:
        fd = os.dup(f.fileno())
    os.ftruncate(fd, nbytes)
    return fd


def _read_only(fd):
    """A read-only descriptor of the same memory for the trainer (Linux: reopened through /proc), so it cannot
    even map the ring writable. Elsewhere the same descriptor: the trainer could only spoil its own batches."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return fd


# ---------------------------------------------------------------------------
# The feeder (trusted process)
# ---------------------------------------------------------------------------

class Feeder:
    """The clock and the counters. Every transition happens under one lock, from a request or from the timer."""

    def __init__(self, budget, warmup_tokens, warmup_limit, status_path=None, out=sys.stdout):
        self.budget, self.warmup_allowance, self.warmup_limit = float(budget), int(warmup_tokens), float(warmup_limit)
        self.status_path, self.out = status_path and Path(status_path), out
        self.lock = threading.Lock()
        self.phase, self.reason = "waiting", None
        self.B = self.T = None
        self.warmup_start = self.clock_start = self.end_time = None
        self.tokens = self.warmup_tokens = self.batches = self.warmup_batches = 0
        self.epoch = 0
        self.last_status = 0.0

    # -- time -----------------------------------------------------------------------------------------------
    def elapsed(self, now):
        if self.clock_start is None:
            return 0.0
        return min(self.budget, (self.end_time or now) - self.clock_start)

    def _advance(self, now):
        """Phase changes that time alone causes: the warm-up's limit, the budget's end."""
        if self.phase == "warm-up" and now - self.warmup_start >= self.warmup_limit:
            self._start_clock(self.warmup_start + self.warmup_limit)
        if self.phase == "training" and now - self.clock_start >= self.budget:
            self._end(self.clock_start + self.budget, "budget spent")

    def _start_clock(self, at):
        self.phase, self.clock_start = "training", at
        self._write_status(force=True)

    def _end(self, at, reason):
        if self.phase == "ended":
            return
        self.phase, self.reason, self.end_time = "ended", reason, at
        report = self.figures()
        self._write_status(force=True)
        print(json.dumps(report), file=self.out, flush=True)

    # -- requests -------------------------------------------------------------------------------------------
    def begin(self, B, T):
        with self.lock:
            self.B, self.T = B, T
            self.phase, self.warmup_start = "warm-up", time.monotonic()
            self._write_status(force=True)

    def admit(self):
        """Decide the fate of one request: WARMUP_BATCH, TRAIN_BATCH or END. Counts the batch if served."""
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            n = self.B * self.T
            if self.phase == "warm-up":
                if self.warmup_batches == 0 or self.warmup_tokens + n <= self.warmup_allowance:
                    self.warmup_tokens += n
                    self.warmup_batches += 1
                    return WARMUP_BATCH
                self._start_clock(now)  # the allowance is spent: this request is the first that counts
            if self.phase == "training":
                self.tokens += n
                self.batches += 1
                self._write_status()
                return TRAIN_BATCH
            return END

    def finish(self, reason):
        """The trainer said it is done, or went away."""
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            if self.phase == "warm-up":
                self._start_clock(now)
            if self.phase == "training":
                self._end(now, reason)
            elif self.phase == "waiting":
                self.phase = "training"
                self.clock_start = now
                self._end(now, reason)

    def tick(self):
        with self.lock:
            if self.phase in ("warm-up", "training"):
                self._advance(time.monotonic())
                self._write_status()

    # -- reporting ------------------------------------------------------------------------------------------
    def figures(self):
        now = time.monotonic()
        return {"phase": self.phase, "reason": self.reason, "training_seconds": round(self.elapsed(now), 3),
                "budget_seconds": self.budget, "tokens": self.tokens, "batches": self.batches,
                "warmup_tokens": self.warmup_tokens, "warmup_batches": self.warmup_batches,
                "warmup_allowance": self.warmup_allowance, "epoch": self.epoch, "B": self.B, "T": self.T,
                "updated_at": round(time.time(), 3)}

    def _write_status(self, force=False):
        now = time.monotonic()
        if not self.status_path or (not force and now - self.last_status < STATUS_SECONDS):
            return
        self.last_status = now
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        tmp.write_text(json.dumps(self.figures()) + "\n")
        os.replace(tmp, self.status_path)


def _check_hello(hello, max_batch_tokens=MAX_BATCH_TOKENS):
    """(B, T) from the trainer's hello, or FeedError saying what is wrong."""
    if not isinstance(hello, dict) or set(hello) - {"B", "T", "split"}:
        raise FeedError(f"the hello takes B, T and split only, got {sorted(hello) if isinstance(hello, dict) else hello}")
    if hello.get("split", "train") != "train":
        raise FeedError(f"the feeder serves the train split only, not {hello.get('split')!r}: "
                        "validation data is for the evaluator")
    B, T = hello.get("B"), hello.get("T")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (B, T)):
        raise FeedError(f"B and T must be positive integers, got B={B!r}, T={T!r}")
    if B * (T + 1) > max_batch_tokens:
        raise FeedError(f"a batch of {B} x {T + 1} tokens is over the feeder's {max_batch_tokens:,}-token limit")
    return B, T


def serve(sock, open_batches, feeder):
    """Serve one trainer on sock until the budget ends or the trainer goes away. open_batches(B, T) returns the
    infinite generator of (int64 [B, T+1] array, epoch): prepare's packer over the train split, prefetched."""
    try:
        hello, _ = _recv_json(sock)
        B, T = _check_hello(hello)
    except (FeedError, ValueError, EOFError, OSError) as e:
        try:
            _send_json(sock, {"ok": False, "error": str(e) or type(e).__name__})
        except OSError:
            pass
        feeder.finish("refused: " + (str(e) or type(e).__name__))
        return
    try:
        batches = open_batches(B, T)
    except Exception as e:  # not prepared, corrupt cache: the trainer's log gets the same one-line reason
        _send_json(sock, {"ok": False, "error": str(e)})
        raise
    slot_tokens = B * (T + 1)
    shm_fd = _shared_memory(SLOTS * slot_tokens * TOKEN_DTYPE().itemsize)
    ring = np.frombuffer(mmap.mmap(shm_fd, SLOTS * slot_tokens * TOKEN_DTYPE().itemsize), dtype=TOKEN_DTYPE)
    ring = ring.reshape(SLOTS, B, T + 1)
    feeder.begin(B, T)
    trainer_fd = _read_only(shm_fd)
    _send_json(sock, {"ok": True, "B": B, "T": T, "slots": SLOTS, "dtype": np.dtype(TOKEN_DTYPE).str,
                      "budget": feeder.budget, "warmup_tokens": feeder.warmup_allowance}, fds=[trainer_fd])
    for fd in {shm_fd, trainer_fd}:
        os.close(fd)
    served = 0
    try:
        while True:
            try:
                request = sock.recv(1)
            except OSError:
                request = b""
            if request != NEXT:
                feeder.finish("trainer finished" if request == QUIT else "trainer closed the feed")
                return
            kind = feeder.admit()
            slot = served % SLOTS
            try:
                if kind == END:  # said once; then the socket closes, so any further request meets EOF
                    sock.sendall(REPLY.pack(END, -1, feeder.epoch, feeder.elapsed(time.monotonic()), feeder.tokens))
                    return
                batch, epoch = next(batches)
                np.copyto(ring[slot], batch, casting="unsafe")
                served += 1
                feeder.epoch = epoch
                sock.sendall(REPLY.pack(kind, slot, epoch, feeder.elapsed(time.monotonic()), feeder.tokens))
            except (BrokenPipeError, ConnectionResetError):  # it asked ahead, then left before the answer
                feeder.finish(_why_gone(sock))
                return
    finally:
        batches.close()  # stops the packing thread


def _why_gone(sock):
    """The reason a trainer that stopped reading left: a QUIT still unread means it finished as it should."""
    try:
        rest = sock.recv(64, socket.MSG_DONTWAIT)
    except OSError:
        rest = b""
    return "trainer finished" if QUIT in rest else "trainer closed the feed"


def _timer(feeder, done):
    while not done.wait(STATUS_SECONDS / 2):
        feeder.tick()


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="The harness's feeder: serves train batches, owns the clock.")
    parser.add_argument("--fd", type=int, required=True, help="the inherited socket to the trainer")
    parser.add_argument("--status", help="status file, rewritten atomically (JSON)")
    parser.add_argument("--warmup-tokens", type=int, help="override the profile's warm-up allowance (tests)")
    parser.add_argument("--warmup-limit", type=float, help="override the profile's warm-up time limit (tests)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))  # the harness next to this file, whatever sys.path says (python -I)
    import prepare  # resolves the settings from the environment, exactly as for the trainer
    settings = prepare.SETTINGS
    profile = settings.profile.name
    feeder = Feeder(settings.time_budget,
                    WARMUP_TOKENS.get(profile, 0) if args.warmup_tokens is None else args.warmup_tokens,
                    WARMUP_LIMIT_SECONDS.get(profile, 300) if args.warmup_limit is None else args.warmup_limit,
                    args.status)
    feeder._write_status(force=True)
    sock = socket.socket(fileno=args.fd)

    def open_batches(B, T):
        tokenizer = prepare.Tokenizer.load()
        tokens, offsets = prepare.load_split(tokenizer, "train")  # the train split: nothing else, ever
        packed = prepare.packed_batches(tokens, offsets, B, T, tokenizer.get_bos_token_id(), settings.seed)
        return prepare._prefetch(packed, PREFETCH)  # packed in a thread, ahead of requests

    done = threading.Event()
    threading.Thread(target=_timer, args=(feeder, done), daemon=True, name="feeder-timer").start()
    try:
        serve(sock, open_batches, feeder)
    except Exception as e:  # the run fails with the reason, and the figures so far are still reported
        message = str(e) if isinstance(e, prepare.PrepareError) else f"{type(e).__name__}: {e}"
        print(f"error: feeder: {message}", file=sys.stderr, flush=True)
        feeder.finish(f"error: {message}")
        return 2
    finally:
        done.set()
        sock.close()
    return 0


# ---------------------------------------------------------------------------
# The trainer's side: an iterator shaped like make_dataloader's
# ---------------------------------------------------------------------------

class FeederLoader:
    """Iterator of (x, y, epoch): x, y int64 [B, T] on device, y shifted by one, the train split in prepare's order
    for the run's seed. Ends (StopIteration) when the feeder says the budget is spent.

    progress   fraction of the budget used, 0 during warm-up, live between batches: drive LR schedules with it.
    phase      "warm-up", "training" or "ended".
    A background thread keeps `prefetch` batches ready, copied out of the shared ring (pinned on CUDA)."""

    def __init__(self, B, T, split="train", device="cpu", fd=None, prefetch=2, announce=True):
        import torch
        if split != "train":
            raise FeedError(f"the feeder serves the train split only, not {split!r}: evaluate with evaluate_bpb")
        self.torch, self.B, self.T, self.device = torch, B, T, torch.device(device)
        self.announce = announce
        self.process = None
        if fd is None and os.environ.get(FD_ENV):
            fd = int(os.environ[FD_ENV])
        if fd is None:
            fd = self._start_own_feeder()
        self.sock = socket.socket(fileno=fd)
        _send_json(self.sock, {"B": B, "T": T, "split": split})
        try:
            info, fds = _recv_json(self.sock, with_fds=True)
        except EOFError:
            raise FeedError("the feeder closed the connection before answering") from None
        if not info.get("ok"):
            raise FeedError(f"the feeder refused: {info.get('error')}")
        self.budget, self.warmup_allowance = info["budget"], info["warmup_tokens"]
        nbytes = info["slots"] * B * (T + 1) * np.dtype(info["dtype"]).itemsize
        self.ring = np.frombuffer(mmap.mmap(fds[0], nbytes, prot=mmap.PROT_READ), dtype=info["dtype"])
        self.ring = self.ring.reshape(info["slots"], B, T + 1)
        os.close(fds[0])
        self.phase, self.clock, self.tokens = "warm-up", (0.0, time.monotonic()), 0
        self.queue, self.stop = queue.Queue(maxsize=prefetch), threading.Event()
        self.ended, self.asking, self.asked = threading.Event(), threading.Condition(), 0
        self.thread = threading.Thread(target=self._fetch, daemon=True, name="feeder-client")
        self.thread.start()
        self.announced = None

    def _start_own_feeder(self):
        """By hand (no server): a feeder of our own, on a socket pair, with this process's environment."""
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, str(HERE / "feeder.py"), "--fd", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), stdout=sys.stderr)
        theirs.close()
        return ours.detach()

    def _fetch(self):
        torch = self.torch
        pin = self.device.type == "cuda"
        put = 0
        try:
            self.sock.sendall(NEXT)
            while not self.stop.is_set():
                kind, slot, epoch, elapsed, tokens = REPLY.unpack(_recv_exact(self.sock, REPLY.size))
                self.clock = (elapsed, time.monotonic())  # the feeder's clock, as of this reply
                self.tokens = tokens
                if kind == END:
                    self.ended.set()
                    self.queue.put(None)
                    return
                # straight from the ring into the final int64 tensors, in this thread (numpy converts fast,
                # torch's uint16 kernels are slow), pinned for an asynchronous copy to the GPU
                x = torch.empty((self.B, self.T), dtype=torch.int64, pin_memory=pin)
                y = torch.empty((self.B, self.T), dtype=torch.int64, pin_memory=pin)
                np.copyto(x.numpy(), self.ring[slot, :, :-1])
                np.copyto(y.numpy(), self.ring[slot, :, 1:])
                self.queue.put((x, y, epoch, kind))
                put += 1
                # No look-ahead in warm-up: the next request may be the one that starts the clock, so it waits
                # until the trainer really asks for it. In training, `prefetch` batches wait ready in the queue.
                with self.asking:
                    while kind == WARMUP_BATCH and self.asked <= put:
                        if self.stop.is_set():
                            return
                        self.asking.wait(0.1)
                self.sock.sendall(NEXT)
        except (EOFError, OSError) as e:
            if not self.stop.is_set():
                self.queue.put(FeedError(f"the feeder went away ({type(e).__name__})"))

    def __iter__(self):
        return self

    def __next__(self):
        if self.phase == "ended" or self.ended.is_set():
            return self._end()
        with self.asking:
            self.asked += 1
            self.asking.notify()
        item = self.queue.get()
        if item is None or self.ended.is_set():
            return self._end()
        if isinstance(item, BaseException):
            raise item
        x, y, epoch, kind = item
        self.phase = "warm-up" if kind == WARMUP_BATCH else "training"
        if self.phase == "training" and self.progress >= 1.0:
            return self._end()  # served in time but taken after the budget: an honest trainer stops here
        self._announce(self.phase)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), epoch

    def _end(self):
        self.phase = "ended"
        raise StopIteration

    def _announce(self, phase):
        # The log protocol's `phase: training` line, printed by harness code the moment the feeder's clock starts
        # for the trainer (train.py announces compiling / warm-up itself, before its first step).
        if self.announce and phase == "training" and self.announced != phase:
            self.announced = phase
            print("phase: training", flush=True)

    @property
    def training_seconds(self):
        """The feeder's clock: training seconds used so far (the official figure comes from the feeder's report)."""
        return self.progress * self.budget

    @property
    def progress(self):
        """Fraction of the budget used: the feeder's clock at the last batch, advanced by the time since."""
        if self.phase == "warm-up":
            return 0.0
        elapsed, at = self.clock
        return min(1.0, (elapsed + time.monotonic() - at) / self.budget)

    def close(self):
        """Tell the feeder we are done (the clock stops now if the budget is not spent yet)."""
        if self.stop.is_set():
            return
        self.stop.set()
        try:
            self.sock.sendall(QUIT)
        except OSError:
            pass
        self.sock.close()
        if self.process is not None:
            self.process.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def feeder_dataloader(tokenizer, B, T, split="train", device="cpu", **kw):
    """make_dataloader's drop-in for training, same arguments: batches from the harness's feeder (FeederLoader).
    The tokenizer is accepted for the same signature; the feeder reads the run's own (and the run's seed)."""
    return FeederLoader(B, T, split=split, device=device, **kw)


if __name__ == "__main__":
    sys.exit(main())
