"""Process trees (server/processes.py): what counts as one run's processes, and taking them down.

A run's processes are its leader's group and session, every descendant, and everything carrying the run's
environment marker: an orphan in a session of its own, reparented away from the run, is found only by the marker.
"""

import os
import subprocess
import sys
import time

from server import processes

MARKER = "AUTORESEARCH_TEST_MARKER"


def spawn(code: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})}, **kwargs)


def wait_for_file(path, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.05)
    return path.read_text().strip()


ORPHAN = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1] if len(sys.argv) > 1 else os.environ["PIDFILE"], "w").write(str(child.pid))
os._exit(0)  # the parent goes at once: the child is reparented, in a session of its own
"""


def test_a_leaders_descendants_are_its_run(tmp_path):
    pidfile = tmp_path / "pid"
    leader = spawn("import subprocess, sys, time, os\n"
                   "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
                   "start_new_session=True)\n"
                   f"open({str(pidfile)!r}, 'w').write(str(c.pid))\ntime.sleep(120)", start_new_session=True)
    try:
        child = int(wait_for_file(pidfile))
        found = processes.run_processes(leader.pid, {})
        assert leader.pid in found and child in found  # the child left the session but is a descendant
        assert os.getpid() not in found
        processes.kill_processes(leader.pid, found, 0)
        assert not processes.is_alive(child, found[child])
    finally:
        leader.kill()
        leader.wait()


def test_an_orphan_in_its_own_session_is_found_only_by_the_runs_marker(tmp_path):
    pidfile = tmp_path / "pid"
    parent = spawn(ORPHAN, env={"PIDFILE": str(pidfile), MARKER: str(tmp_path)}, start_new_session=True)
    parent.wait()
    orphan = int(wait_for_file(pidfile))
    try:
        assert orphan not in processes.run_processes(parent.pid, {})  # no longer anyone's descendant
        found = processes.run_processes(parent.pid, {}, (MARKER, str(tmp_path)))
        assert orphan in found
        assert orphan not in processes.run_processes(parent.pid, {}, (MARKER, str(tmp_path / "other run")))
        assert processes.run_processes(parent.pid, {}, (MARKER, None)) == {}  # no marker: nothing by marker
        alive = processes.kill_processes(None, found, 1.0)
        assert orphan in alive and not processes.is_alive(orphan, found[orphan])
    finally:
        if processes.is_alive(orphan):
            os.kill(orphan, 9)


def test_a_pid_is_signalled_only_while_it_is_the_process_first_seen():
    proc = spawn("import time; time.sleep(120)")
    try:
        started = processes.create_time(proc.pid)
        assert processes.is_alive(proc.pid, started)
        assert not processes.is_alive(proc.pid, started - 5)  # same pid, another start: a reused pid
        assert processes.kill_processes(None, {proc.pid: started - 5}, 0) == {}
        assert proc.poll() is None  # untouched
    finally:
        proc.kill()
        proc.wait()
    assert not processes.is_alive(proc.pid, started)
