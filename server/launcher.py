"""The trusted parent of one run: `python -I -m server.launcher SERVER_PID --result-fd N --spec JSON`.

It leads the run's process group, holds the device lock (the descriptor the server passed it), and runs the run's
trusted pipeline (server/pipeline.py: feeder, sandboxed trainer, evaluator), none of which inherits that
descriptor or the result pipe. When the pipeline ends it writes the official result as one JSON line to the result
pipe (fd N, the server holds the read end) and exits 0; a non-zero exit means it broke before it had a result.
If the server dies (kill -9, a crash, a closed laptop lid that never reopens), nothing would ever record, watch or
stop the run, so the launcher takes the run down itself: its process group, every descendant it saw and anything
carrying the run's environment marker; then it exits and the device lock frees itself. The next server records
the run interrupted. Installed code only: it runs with -I, so nothing in the workspace or run folder is on its
import path.
"""

import argparse
import json
import os
import signal
import sys
import threading

from server import processes
from server.layout import RESULT_ENV
from server.pipeline import run_pipeline, write_result

POLL_SECONDS = 0.2  # how often it checks that the server is still its parent
TRACK_SECONDS = 1.0  # how often it records the run's descendants (they may leave the group later)
GRACE_SECONDS = 5.0  # SIGTERM, then SIGKILL after this long


def take_down(tracked: processes.Procs) -> None:
    procs = {**tracked, **processes.run_processes(os.getpid(), tracked, (RESULT_ENV, os.environ.get(RESULT_ENV)))}
    processes.kill_processes(None, procs, GRACE_SECONDS)


def guard(server_pid: int) -> None:
    """A thread beside the pipeline: records the run's descendants, and takes the run down when the server is
    gone (or when the server stops the run with SIGTERM: the trainer leads a session of its own)."""
    tracked: processes.Procs = {}
    ticks = 0
    while True:
        if os.getppid() != server_pid or stopping.wait(POLL_SECONDS):
            if os.getppid() != server_pid:
                print("autoresearch: the server stopped; the launcher is stopping this run", flush=True)
            take_down(tracked)
            os._exit(1)
        ticks += 1
        if ticks * POLL_SECONDS >= TRACK_SECONDS:
            ticks = 0
            tracked.update(processes.run_processes(os.getpid(), tracked))


stopping = threading.Event()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="server.launcher")
    parser.add_argument("server_pid", type=int)
    parser.add_argument("--result-fd", type=int, required=True)
    parser.add_argument("--spec", required=True, help="the pipeline's spec, one JSON object")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    threading.Thread(target=guard, args=(args.server_pid,), daemon=True, name="launcher-guard").start()
    if spec.get("ray"):  # the pipeline runs on a Ray node; this process streams it (server/ray_executor.py)
        from server.ray_executor import run_remote
        result = run_remote(spec)
    else:
        result = run_pipeline(spec)
    write_result(args.result_fd, result)
    sys.exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
