"""The harness's feeder: it serves the train split in the loader's order, owns the clock and stops at the budget.
Each test starts a real feeder process on a socket pair, as the server does, and talks to it as train.py would."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "training"))
import feeder  # noqa: E402
import prepare  # noqa: E402

from server import sandbox  # noqa: E402

FEEDER = ROOT / "training" / "feeder.py"
B, T = 4, 64
EXIT_LIMIT = 60  # seconds a feeder gets to answer or exit: a limit, never a measured figure


@pytest.fixture
def start(prepared_cache, tmp_path):
    """start(budget, warmup_tokens, warmup_limit=60, seed=42) -> (feeder process, the trainer's fd, status path)."""
    procs = []

    def start(budget, warmup_tokens, warmup_limit=60, seed=42):
        ours, theirs = socket.socketpair()
        status = tmp_path / f"feeder{len(procs)}.json"
        env = {**os.environ, "AUTORESEARCH_CACHE": str(prepared_cache), "AUTORESEARCH_PROFILE": "smoke",
               "AUTORESEARCH_DATASET": "sotu", "AUTORESEARCH_TIME_BUDGET": str(budget),
               "AUTORESEARCH_SEED": str(seed)}
        proc = subprocess.Popen([sys.executable, str(FEEDER), "--fd", str(theirs.fileno()), "--status", str(status),
                                 "--warmup-tokens", str(warmup_tokens), "--warmup-limit", str(warmup_limit)],
                                pass_fds=(theirs.fileno(),), env=env, stdout=subprocess.PIPE, text=True)
        theirs.close()
        procs.append(proc)
        return proc, ours.detach(), status

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def report(proc):
    """The feeder's official figures: the JSON line it prints when serving ends."""
    out, _ = proc.communicate(timeout=EXIT_LIMIT)
    return json.loads(out.strip().splitlines()[-1])


def test_the_feeder_serves_the_loaders_stream_for_the_same_seed(start, prepared_cache):
    proc, fd, _ = start(budget=10, warmup_tokens=3 * B * T, seed=7)
    loader = feeder.FeederLoader(B, T, fd=fd, announce=False)
    served = [next(loader) for _ in range(8)]  # 3 warm-up batches, then training ones: one stream
    loader.close()
    tokenizer = prepare.Tokenizer.load("sotu", prepared_cache, 8192)
    reference = prepare.make_dataloader(tokenizer, B, T, "train", seed=7)
    for x, y, epoch in served:
        rx, ry, repoch = next(reference)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(x, rx) and torch.equal(y, ry) and epoch == repoch
    figures = report(proc)
    assert figures["warmup_batches"] == 3 and figures["warmup_tokens"] == 3 * B * T
    assert figures["reason"] == "trainer finished" and figures["tokens"] == figures["batches"] * B * T


def test_serving_stops_at_the_budget_and_never_resumes(start):
    proc, fd, status = start(budget=1, warmup_tokens=0)
    loader = feeder.FeederLoader(B, T, fd=fd, announce=False)
    phases, consumed = [], 0
    for x, y, epoch in loader:
        phases.append(loader.phase)
        consumed += 1
    assert loader.phase == "ended" and loader.progress == 1.0 and loader.training_seconds == 1.0
    with pytest.raises(StopIteration):
        next(loader)
    assert phases[0] == "warm-up" and set(phases[1:]) == {"training"}  # at least one batch is always warm-up
    loader.close()
    figures = report(proc)
    assert figures["reason"] == "budget spent"
    assert figures["training_seconds"] == figures["budget_seconds"] == 1.0
    assert figures["warmup_batches"] == 1 and figures["tokens"] == figures["batches"] * B * T
    assert consumed - 1 <= figures["batches"]  # nothing reaches the trainer that the feeder did not count
    assert json.loads(status.read_text())["phase"] == "ended"


def test_warm_up_time_does_not_count_against_the_budget(start):
    proc, fd, _ = start(budget=1, warmup_tokens=3 * B * T)
    loader = feeder.FeederLoader(B, T, fd=fd, announce=False)
    for _ in range(3):  # a slow compile: the warm-up outlasts the whole budget
        next(loader)
        assert loader.phase == "warm-up" and loader.progress == 0.0
        time.sleep(0.5)
    next(loader)
    assert loader.phase == "training"  # the budget is still all there after 1.5 s of warm-up
    for _ in loader:
        pass
    figures = report(proc)
    assert figures["warmup_batches"] == 3 and figures["batches"] >= 1
    assert figures["training_seconds"] == 1.0 and figures["reason"] == "budget spent"


def test_the_warm_up_cannot_be_stretched_past_its_limit(start):
    """Training for free on the warm-up tokens is bounded: after the limit the clock runs, from the limit on."""
    proc, fd, _ = start(budget=1, warmup_tokens=100 * B * T, warmup_limit=0.5)
    loader = feeder.FeederLoader(B, T, fd=fd, announce=False)
    next(loader)
    time.sleep(2.0)  # limit 0.5 s + budget 1 s have both passed
    with pytest.raises(StopIteration):
        next(loader)
    figures = report(proc)
    assert figures["reason"] == "budget spent" and figures["batches"] == 0 and figures["warmup_batches"] == 1


def test_a_sleeping_trainer_gets_no_more_than_the_budget(start):
    proc, fd, _ = start(budget=1, warmup_tokens=0)
    loader = feeder.FeederLoader(B, T, fd=fd, announce=False, prefetch=2)
    next(loader)  # warm-up
    consumed = 0
    for _ in loader:
        consumed += 1
        time.sleep(0.3)  # the feeder's clock runs in its own process: sleeping spends the budget like training
    figures = report(proc)
    assert figures["training_seconds"] == 1.0
    # each batch consumed took >= 0.3 s, so at most ceil(1 / 0.3) = 4 of them fit in the budget
    assert 1 <= consumed <= 4
    assert figures["batches"] <= consumed + 2 + 1  # the feeder's count includes at most the look-ahead


def test_the_feeder_serves_the_train_split_only(start):
    with pytest.raises(feeder.FeedError, match="train split only"):
        feeder.FeederLoader(B, T, split="val", fd=socket.socketpair()[0].detach())
    proc, fd, status = start(budget=1, warmup_tokens=0)
    sock = socket.socket(fileno=fd)
    feeder._send_json(sock, {"B": B, "T": T, "split": "val"})  # a trainer speaking the protocol by hand
    answer, _ = feeder._recv_json(sock, with_fds=True)
    assert answer["ok"] is False and "train split only" in answer["error"]
    sock.close()
    figures = report(proc)
    assert figures["reason"].startswith("refused") and figures["tokens"] == figures["warmup_tokens"] == 0


@pytest.mark.parametrize("hello", [{"B": 0, "T": 64}, {"B": 4, "T": "64"}, {"B": 2**20, "T": 2**10},
                                   {"B": 4, "T": 64, "path": "val.bin"}])
def test_bad_hellos_are_refused_with_the_reason(hello):
    with pytest.raises(feeder.FeedError):
        feeder._check_hello(hello)


@pytest.mark.skipif(not sandbox.probe()[0] or not sys.platform.startswith("linux"),
                    reason=f"the bubblewrap sandbox does not work here ({sandbox.probe()[1]})")
def test_a_sandboxed_trainer_is_fed_through_the_inherited_socket_but_cannot_read_val(start, prepared_cache, tmp_path):
    proc, fd, _ = start(budget=1, warmup_tokens=0)
    run_dir = tmp_path / "ws" / ".autoresearch" / "runs" / "r0001"
    run_dir.mkdir(parents=True)
    tokens = prepare.tokens_dir(prepared_cache / "sotu", 8192)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'training')!r}); import feeder\n"
            f"loader = feeder.feeder_dataloader(None, {B}, {T}, 'train')\n"
            "n = sum(1 for _ in loader)\n"
            "print('batches', n, 'progress', loader.progress)\n"
            f"try:\n    open({str(tokens / 'val.bin')!r}, 'rb'); print('READ VAL')\n"
            "except OSError:\n    print('val hidden')\n")
    launched = sandbox.build_command([sys.executable, "-c", code], isolation="sandbox", run_dir=run_dir,
                                     state_dir=run_dir.parent.parent, cache_dir=prepared_cache,
                                     readable=[ROOT / "training"])
    trainer = subprocess.run(launched.argv, pass_fds=(fd,), env={**os.environ, feeder.FD_ENV: str(fd)},
                             capture_output=True, text=True, timeout=EXIT_LIMIT * 2)
    os.close(fd)
    assert trainer.returncode == 0, trainer.stderr
    assert "val hidden" in trainer.stdout and "READ VAL" not in trainer.stdout
    assert trainer.stdout.count("phase: training") == 1
    assert "progress 1.0" in trainer.stdout
    assert report(proc)["reason"] == "budget spent"


def test_by_hand_the_client_starts_a_feeder_of_its_own(prepared_cache, monkeypatch):
    for key, value in {"AUTORESEARCH_CACHE": str(prepared_cache), "AUTORESEARCH_PROFILE": "smoke",
                       "AUTORESEARCH_DATASET": "sotu", "AUTORESEARCH_TIME_BUDGET": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(feeder.FD_ENV, raising=False)
    loader = feeder.feeder_dataloader(None, B, T, "train", announce=False)
    n = sum(1 for _ in loader)
    loader.close()
    assert n >= 1 and loader.phase == "ended" and loader.process.returncode == 0


def test_an_unprepared_dataset_is_refused_with_prepares_message(tmp_path):
    ours, theirs = socket.socketpair()
    env = {**os.environ, "AUTORESEARCH_CACHE": str(tmp_path / "empty"), "AUTORESEARCH_PROFILE": "smoke",
           "AUTORESEARCH_DATASET": "sotu"}
    proc = subprocess.Popen([sys.executable, str(FEEDER), "--fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    theirs.close()
    with pytest.raises(feeder.FeedError, match="autoresearch-mcp prepare"):
        feeder.FeederLoader(B, T, fd=ours.detach())
    out, err = proc.communicate(timeout=EXIT_LIMIT)
    assert proc.returncode == 2 and "not prepared" in err and "Traceback" not in err
    assert json.loads(out.strip().splitlines()[-1])["reason"].startswith("error:")


def test_the_trainer_gets_the_ring_read_only():
    import mmap
    fd = feeder._shared_memory(4096)
    ro = feeder._read_only(fd)
    try:
        if sys.platform.startswith("linux"):
            with pytest.raises(PermissionError):
                mmap.mmap(ro, 4096)  # a shared writable mapping of the trainer's descriptor
        assert len(mmap.mmap(ro, 4096, prot=mmap.PROT_READ)) == 4096
    finally:
        os.close(fd)
        if ro != fd:
            os.close(ro)
