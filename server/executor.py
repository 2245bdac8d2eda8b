"""Placing a run on a device: the machine-wide device lock and the launch of the run's processes.

One lock file per device (cpu, cuda:0, ...) in one folder per machine (server/layout.py), whatever the workspace
or data cache, so two servers never train on one device at once. The lock is an flock held by the run's launcher
(server/launcher.py): it lives exactly as long as the run's processes, a holder that dies frees it by itself, and a
server killed with SIGKILL takes its run down through the launcher. The parallel-experiments issue grows this into
a pool of devices (--devices) and a Ray executor behind the same two calls: acquire a device, launch a run on it.
"""

import fcntl
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from server import processes
from server.errors import WorkspaceError
from server.layout import device_lock_dir


@dataclass
class DeviceLock:
    device: str
    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe_holder(self, info: dict) -> None:
        """Write who holds the lock into the lock file, for the busy message another server shows."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(info).encode() + b"\n", 0)


def lock_path(device: str) -> Path:
    return device_lock_dir() / (re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock")


def acquire_device(device: str) -> DeviceLock:
    """The device's lock, or WorkspaceError saying who holds it."""
    path = lock_path(device)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_NOFOLLOW: a lock file planted as a symlink must not make us truncate whatever it points at
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        info = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        raise WorkspaceError(busy_message(device, path, info)) from None
    return DeviceLock(device, path, fd)


def busy_message(device: str, path: Path, info: str) -> str:
    try:
        holder = json.loads(info)
    except ValueError:
        holder = {}
    holder = holder if isinstance(holder, dict) else {}
    who = (f"run {holder.get('run_id')} of workspace {holder.get('workspace')} (pid {holder.get('pid')}, "
           f"started {holder.get('started')})") if holder else "another process"
    msg = f"The {device} device is busy: {who} holds {path}. One run at a time per device; "
    if holder.get("pid") and not processes.is_alive(holder["pid"], holder.get("create_time")):
        return msg + (f"its main process has exited but a process it spawned still holds the lock; find it "
                      f"with `fuser {path}` and stop it.")
    return msg + "wait for that run to end or cancel it (a lock whose holder dies frees itself)."


class LocalExecutor:
    """Runs on this machine, one device (a pool of them is the parallel-experiments issue's work)."""

    def __init__(self, device: str, python: str = sys.executable):
        self.device = device
        self.python = python

    def acquire(self) -> DeviceLock:
        return acquire_device(self.device)

    def ensure_free(self) -> None:
        """Raise the busy error now, before the caller commits anything for a run that could not start."""
        self.acquire().release()

    def launch(self, lock: DeviceLock, spec: dict, cwd: Path, env: dict, log_path: Path,
               result_fd: int) -> subprocess.Popen:
        """Start the run's trusted pipeline (server/pipeline.py, spec a JSON-able dict) under the launcher, which
        holds the device lock, leads a new session, and writes the official result to result_fd (the write end of
        a pipe whose read end the caller keeps)."""
        spec = {**spec, "python": spec.get("python") or self.python, "executor": "local", "device": self.device}
        command = [sys.executable, "-I", "-m", "server.launcher", str(os.getpid()), "--result-fd", str(result_fd),
                   "--spec", json.dumps(spec)]
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    pass_fds=(lock.fd, result_fd))
