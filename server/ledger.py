"""The run ledger: an append-only JSON-lines file that is the source of truth for every session, run and
noise measurement in a workspace, plus results.tsv, a view of it in upstream autoresearch's format.

Durability rules (a night of results must survive a crash or a power cut):
- a record is one line written with a single os.write on an O_APPEND descriptor, then fsynced, so two
  processes appending at once never interleave inside a line;
- the reader skips (and reports) a torn or garbled line instead of failing, and never drops a good one;
- results.tsv is never edited, only rebuilt from the ledger and swapped in atomically.
"""

import json
import logging
import os
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path

from server.layout import LEDGER_NAME, RESULTS_NAME, STATE_DIR, TSV_HEADER  # noqa: F401 (names kept here too)

# results.tsv speaks upstream's vocabulary: keep | discard | crash, plus the states a live loop has
TSV_STATUS = {"queued": "queued", "starting": "running", "running": "running",  # queued: waiting for a device
              "succeeded": "pending"}  # any other undecided status is a crash
BLANKS = str.maketrans("\t\r\n", "   ")

log = logging.getLogger(__name__)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    def __init__(self, workspace: Path):
        self.workspace = Path(workspace)
        self.dir = self.workspace / STATE_DIR
        self.path = self.dir / LEDGER_NAME
        self.results_path = self.workspace / RESULTS_NAME
        self.damaged_lines: list[int] = []  # 1-based line numbers of lines that are not a JSON object
        # Parse cache: complete lines are parsed once; only bytes appended since are read on the next call.
        self._lock = threading.Lock()
        self._stamp = None      # (inode, size, mtime_ns) of the file when last parsed
        self._offset = 0        # bytes consumed, always just after a newline
        self._lines = 0         # complete lines consumed
        self._records: list[dict] = []
        self._damaged: list[int] = []  # damaged complete lines (the trailing fragment is judged per read)
        self._tail: dict | None = None  # a final line without its newline that still parses
        self._folded: dict[str, dict] = {}  # run id -> folded run, over self._records[:self._folded_upto]
        self._folded_upto = 0

    # ---- writing

    def append(self, record: dict) -> None:
        """Durably add one record, then rebuild results.tsv. Returns only once the line is on disk."""
        record = {"time": now_iso(), **record}
        line = json.dumps(record).encode() + b"\n"  # ASCII-escaped: no text can fail to encode
        self.dir.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        # O_APPEND puts every write at the end even with other writers; RDWR lets us peek at the last byte.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A torn last line (crash mid-write) must not swallow this record: start on a fresh line.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes): is the disk full?")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:  # the new directory entry must survive a power cut too
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        self.write_results_tsv()

    def write_results_tsv(self) -> None:
        """Rebuild results.tsv from the ledger. The temp file lives in the git-ignored state dir so a crash
        never leaves an untracked file in the user's worktree; no fsync because the ledger can rebuild it."""
        text = self.results_tsv()
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix="results.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.results_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ---- reading

    def records(self) -> list[dict]:
        """Every well-formed record in file order. Damage is skipped and listed in self.damaged_lines."""
        with self._lock:
            self._refresh()
            records = self._records + ([self._tail] if self._tail is not None else [])
        return [dict(r) for r in records]  # copies, so a caller's edits never leak into the cache

    def runs(self, session_tag: str | None = None) -> list[dict]:
        """Run records folded by id (a later record updates the fields of earlier ones), in start order.
        The fold is kept between calls and extended by appended records only: the ledger never rewrites."""
        with self._lock:
            self._refresh()
            for rec in self._records[self._folded_upto:]:
                if rec.get("type") == "run" and isinstance(rec.get("id"), str):
                    self._folded.setdefault(rec["id"], {}).update(rec)
            self._folded_upto = len(self._records)
            folded = {run_id: dict(run) for run_id, run in self._folded.items()}  # copies, as records() gives
            tail = self._tail
        if tail is not None and tail.get("type") == "run" and isinstance(tail.get("id"), str):
            folded.setdefault(tail["id"], {}).update(tail)
        runs = list(folded.values())
        if session_tag is not None:
            runs = [r for r in runs if r.get("session") == session_tag]
        return runs

    def run(self, run_id: str) -> dict | None:
        return next((r for r in self.runs() if r["id"] == run_id), None)

    def next_run_id(self) -> str:
        """r0001, r0002, ...: numbered across all sessions so a run id names one run in the workspace."""
        numbers = [int(r["id"][1:]) for r in self.runs() if r["id"][:1] == "r" and r["id"][1:].isdigit()]
        return f"r{max(numbers, default=0) + 1:04d}"

    def session(self) -> dict | None:
        return self._latest(lambda r: r.get("type") == "session")

    def noise(self, profile: str, dataset: str) -> dict | None:
        return self._latest(lambda r: r.get("type") == "noise" and r.get("profile") == profile
                            and r.get("dataset") == dataset)

    def _latest(self, match) -> dict | None:
        return next((r for r in reversed(self.records()) if match(r)), None)

    def _refresh(self) -> None:
        """Bring the cache up to date, reading only what was appended since the last call."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        stamp = st and (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        if st is None or self._stamp is None or st.st_ino != self._stamp[0] or st.st_size < self._offset:
            self._reset()  # first read, or the file was replaced or truncated: start over
        self._stamp = stamp
        if st is None:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        *complete, fragment = data.split(b"\n")
        for raw in complete:
            self._lines += 1
            self._offset += len(raw) + 1
            if raw.strip():
                self._parse(raw, self._lines, self._records, self._damaged)
        # The final piece has no newline yet: a record whose newline was lost still counts, but it is
        # re-judged on every read because a concurrent append may complete it.
        tail_records, tail_damage = [], []
        if fragment.strip():
            self._parse(fragment, self._lines + 1, tail_records, tail_damage)
        self._tail = tail_records[0] if tail_records else None
        self.damaged_lines = self._damaged + tail_damage

    def _reset(self) -> None:
        self._stamp, self._offset, self._lines, self._tail = None, 0, 0, None
        self._records, self._damaged = [], []
        self._folded, self._folded_upto = {}, 0

    def _parse(self, raw: bytes, lineno: int, records: list, damaged: list) -> None:
        try:
            record = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
            record = None
        if isinstance(record, dict):
            records.append(record)
            return
        damaged.append(lineno)
        if lineno not in self.damaged_lines:  # report each damaged line once, not on every read
            log.warning("%s line %d is damaged (torn write or garbage) and was skipped: %r",
                        self.path, lineno, raw[:80])

    # ---- results.tsv

    def results_tsv(self) -> str:
        """Upstream's results.tsv for the current session (every run when no session was started)."""
        session = self.session()
        runs = self.runs(session.get("tag") if session else None)
        return TSV_HEADER + "".join(_tsv_row(r) for r in runs)


def row_status(run: dict) -> str:
    """Upstream's vocabulary: keep, discard, crash (any failure); plus queued, running, and pending for an undecided
    success."""
    if run.get("status") != "succeeded":
        return TSV_STATUS.get(run.get("status"), "crash")
    return run.get("decision") if run.get("decision") in ("keep", "discard") else "pending"


def ran_on(run: dict, runs: list[dict]) -> str | None:
    """Where a run trained, for people: its device (cuda:1, cpu:0), prefixed with its node when the session's
    runs trained on more than one node (a Ray cluster), so a bad node or GPU stands out in a table or chart."""
    device = run.get("device")
    nodes = {r.get("node") for r in runs if r.get("node")}
    if len(nodes) > 1 and run.get("node"):
        return f"{run['node']}/{device or '?'}"
    return device


def _tsv_row(run: dict) -> str:
    status = row_status(run)
    metrics = run.get("metrics") if isinstance(run.get("metrics"), dict) else {}
    description = str(run.get("description") or "").translate(BLANKS)  # tabs/newlines would break columns
    return (f"{str(run.get('commit') or '')[:7]}\t{_number(run.get('val_bpb')):.6f}\t"
            f"{_number(metrics.get('peak_vram_mb')) / 1024:.1f}\t{status}\t{description}\n")


def _number(value) -> float:
    """A ledger field as a float, 0.0 when absent or unreadable (the TSV must always be writable)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
