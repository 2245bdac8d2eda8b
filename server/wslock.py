"""One lock for the workspace, and one server per workspace.

Every state change (session, edits, run start, keep, discard, cancel, noise) runs under WorkspaceLock: a
re-entrant thread lock (tools run in worker threads) plus an flock on .autoresearch/workspace.lock (other
processes: the CLI, a second server started by mistake). Decisions are re-checked inside it, so of a keep and a
discard of the same run exactly one wins.

ServerClaim is held by the one server serving a workspace for as long as it serves: a second server on the same
workspace refuses to start, so two servers can never run code B while recording commit A. Both locks are flocks:
a server killed with SIGKILL drops them with its last descriptor, and no process it launched inherits them.
"""

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from server.errors import WorkspaceError
from server.layout import SERVER_LOCK_NAME, WORKSPACE_LOCK_NAME, state_dir


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)


class WorkspaceLock:
    def __init__(self, workspace: Path):
        self.path = state_dir(workspace) / WORKSPACE_LOCK_NAME
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    @contextmanager
    def held(self):
        with self._thread_lock:
            if self._depth == 0:
                self._fd = _open_lock(self.path)
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)  # another process's state change takes milliseconds
                except BaseException:
                    os.close(self._fd)
                    raise
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    os.close(self._fd)  # closing the descriptor drops the flock
                    self._fd = -1


class ServerClaim:
    """Counted: serve() claims before it starts, and each MCP session's lifespan claims and releases around it."""

    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.path = state_dir(workspace) / SERVER_LOCK_NAME
        self._mutex = threading.Lock()
        self._count = 0
        self._fd = -1

    def claim(self) -> None:
        with self._mutex:
            if self._count == 0:
                fd = _open_lock(self.path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise WorkspaceError(
                        f"another autoresearch server (pid {holder}) is already serving {self.workspace}; stop it "
                        "first, or connect your client to that one (one server per workspace).") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._fd = fd
            self._count += 1

    def release(self) -> None:
        with self._mutex:
            if self._count == 0:
                return
            self._count -= 1
            if self._count == 0:
                os.close(self._fd)
                self._fd = -1
