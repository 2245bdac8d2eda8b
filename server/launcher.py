"""The trusted parent of one training process: `python -I -m server.launcher SERVER_PID -- CMD...`.

It leads the run's process group, holds the device lock (the descriptor the server passed it), and starts the
training command without that descriptor. It exits with the command's status. If the server dies (kill -9, a
crash, a closed laptop lid that never reopens), nothing would ever record, watch or stop the run, so the launcher
takes the run down itself: its process group, every descendant it saw and anything carrying the run's result-file
environment entry; then it exits and the device lock frees itself. The next server records the run interrupted.
Installed code only: it runs with -I, so nothing in the workspace or run folder is on its import path.
"""

import os
import signal
import subprocess
import sys

from server import processes
from server.harness import RESULT_ENV

POLL_SECONDS = 0.2  # how often it checks that the server is still its parent
TRACK_SECONDS = 1.0  # how often it records the run's descendants (they may leave the group later)
GRACE_SECONDS = 5.0  # SIGTERM, then SIGKILL after this long


def take_down(tracked: processes.Procs) -> None:
    procs = {**tracked, **processes.run_processes(os.getpid(), tracked)}
    if os.environ.get(RESULT_ENV):
        procs.update(processes.processes_with_env(RESULT_ENV, os.environ[RESULT_ENV]))
    procs.pop(os.getpid(), None)
    processes.kill_processes(None, procs, GRACE_SECONDS)


def exit_like(returncode: int) -> None:
    """Exit with the child's status; a child killed by a signal makes the launcher die of the same signal, so the
    server reports "killed by SIGKILL" exactly as if it had watched train.py itself."""
    if returncode < 0:
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, nor reset
            signal.signal(-returncode, signal.SIG_DFL)
        os.kill(os.getpid(), -returncode)
        returncode = 128 - returncode
    sys.exit(returncode)


def main(argv: list[str]) -> None:
    server_pid, command = int(argv[0]), argv[argv.index("--") + 1:]
    child = subprocess.Popen(command, close_fds=True)  # our group, our stdout (the log), no device-lock descriptor
    tracked: processes.Procs = {}
    ticks = 0
    while True:
        try:
            returncode = child.wait(POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != server_pid:
            print("autoresearch: the server stopped; the launcher is stopping this run", flush=True)
            take_down({child.pid: processes.create_time(child.pid) or 0.0, **tracked})
            child.wait()
            sys.exit(1)
        ticks += 1
        if ticks * POLL_SECONDS >= TRACK_SECONDS:
            ticks = 0
            tracked.update(processes.run_processes(os.getpid(), tracked))
    exit_like(returncode)


if __name__ == "__main__":
    main(sys.argv[1:])
