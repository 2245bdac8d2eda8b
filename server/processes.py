"""Process trees through psutil, one code path for Linux and macOS.

A process is named by (pid, create_time): pids get reused, so every pid we signal is re-checked against the start
time we saw first. A run's processes are its process group / session (its leader started one), every descendant
ever seen (a child that called setsid left the group but is still a descendant), and anything carrying the run's
unique environment marker (a double-forked daemon whose parent is gone).
"""

import os
import signal
import time

import psutil

GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)

Procs = dict[int, float]  # {pid: create_time}


def create_time(pid: int | None) -> float | None:
    """When the process started (its identity beside the pid), or None if it is gone."""
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except GONE:
        return None


def is_alive(pid: int | None, started: float | None = None) -> bool:
    """Running (not a zombie) and, when `started` is given, the very process we saw earlier."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return started is None or abs(proc.create_time() - started) < 0.01
    except GONE:
        return False


def _snapshot() -> dict[int, dict]:
    """Every live process: {pid: {"ppid", "pgid", "sid", "create_time"}} (pgid/sid best effort)."""
    procs = {}
    for proc in psutil.process_iter(["ppid", "create_time", "status"]):
        info = proc.info
        if info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or info["create_time"] is None:
            continue
        try:
            pgid, sid = os.getpgid(proc.pid), os.getsid(proc.pid)
        except OSError:
            continue
        procs[proc.pid] = {"ppid": info["ppid"], "pgid": pgid, "sid": sid, "create_time": info["create_time"]}
    return procs


def run_processes(root: int, known: Procs, marker: tuple[str, str] | None = None) -> Procs:
    """{pid: create_time} of a run's live processes: root's group and session (root leads both), the known ones
    still alive, every descendant of any of them and, given the run's environment marker (name, value), every
    process that carries it: one spawned an instant ago by a parent that is already gone (reparented, in a session
    of its own) is found by nothing else."""
    procs = _snapshot()
    found = {pid: p["create_time"] for pid, p in procs.items() if root in (p["pgid"], p["sid"])}
    found.update({pid: t for pid, t in known.items() if pid in procs and abs(procs[pid]["create_time"] - t) < 0.01})
    children: dict[int, list[int]] = {}
    for pid, p in procs.items():
        children.setdefault(p["ppid"], []).append(pid)
    stack = [root, *found]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found[child] = procs[child]["create_time"]
                stack.append(child)
    if marker and marker[1]:
        found.update(processes_with_env(*marker))
    found.pop(os.getpid(), None)
    return found


def processes_with_env(name: str, value: str) -> Procs:
    """{pid: create_time} of this user's processes whose environment holds name=value exactly: inherited by
    everything a run spawns, even by a daemon whose parent has exited."""
    found = {}
    me = os.getpid()
    for proc in psutil.process_iter(["create_time", "status"]):
        if proc.pid == me or proc.info["status"] in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        try:
            if proc.environ().get(name) == value:
                found[proc.pid] = proc.info["create_time"]
        except (*GONE, OSError):  # another user's process, or gone
            continue
    return found


def signal_processes(pgid: int | None, procs: Procs, sig: int) -> None:
    if pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, started in procs.items():
        if is_alive(pid, started):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def wait_gone(procs: Procs, timeout: float) -> Procs:
    """Wait until these processes are gone (zombies count as gone); returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = {pid: t for pid, t in procs.items() if is_alive(pid, t)}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def kill_processes(pgid: int | None, procs: Procs, grace: float) -> Procs:
    """SIGTERM, then SIGKILL what is left after `grace` seconds. Returns the processes that were alive."""
    alive = {pid: t for pid, t in procs.items() if is_alive(pid, t)}
    if grace > 0:
        signal_processes(pgid, alive, signal.SIGTERM)
        wait_gone(alive, grace)
    signal_processes(pgid, alive, signal.SIGKILL)
    wait_gone(alive, 2.0)
    return alive
