"""Reading a run's log: the log protocol between a run's stdout and the server (team CONTRACTS.md).

- `phase: <name>` at a transition (starting | compiling | warm-up | training | exporting | evaluating);
- step lines: `step 00012 (34.5%) | loss: 3.1 | ... | remaining: 12s`;
- `eval: <rows done>/<rows total> rows` while evaluate_bpb scores the validation rows;
- the `---` summary block at the end.
train.py is agent-edited, so every field is best effort: a log without phase lines (an older train.py) still gets
phases, inferred from the step lines (first step: training; the budget spent: evaluating).
"""

import collections
import math
import os
import re
from pathlib import Path

from server.gitops import TRAIN

TAIL_LINES = 40  # log lines kept in the ledger record of a run that did not succeed
MAX_LINE_CHARS = 1000  # a single log line is cut to this in the tail (a printed tensor can be megabytes)
MAX_READ_BYTES = 2**20  # per read; if the log grew by more, skip ahead (only recent lines matter)
PHASES = ("starting", "compiling", "warm-up", "training", "exporting", "evaluating", "done")
SET_BY_LOG = frozenset(PHASES[:-1])  # "done" is the server's to say, once the run succeeded

PHASE_LINE = re.compile(r"^\s*phase:\s*([\w-]+)\s*$")
EVAL_LINE = re.compile(r"^\s*eval:\s*(\d+)\s*/\s*(\d+)\s*rows\b")
PROGRESS_LINE = re.compile(r"^\s*step\s+(\d+)")
PERCENT = re.compile(r"\(\s*([-+\d.eE]+)\s*%\s*\)")
LOSS = re.compile(r"loss:\s*([-+\w.]+)")
REMAINING = re.compile(r"remaining:\s*([-+\d.eE]+)\s*s")
SUMMARY_LINE = re.compile(r"^([A-Za-z_]\w*):\s+(.*?)\s*$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
FRAME_LINE = re.compile(r'^\s*File "([^"]+)", line (\d+)')
FAIL_LINE = re.compile(r"^FAIL\b")


def empty_progress() -> dict:
    return {"phase": "starting", "step": None, "percent": None, "loss": None, "seconds_left": None,
            "eval_percent": None}


def parse_number(text: str):
    """Summary values: int or float where numeric, the text otherwise ('cuda', 'climbmix')."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if math.isfinite(value) else text  # NaN is not JSON: keep "nan" as text
    return text


def error_line(lines: list[str]) -> str | None:
    """The line of the log that best says why a run failed: train.py's own FAIL message, else the exception
    that ended it (SyntaxError, ModuleNotFoundError, OutOfMemoryError, ...) with where in train.py it was raised,
    else an out-of-memory message, else the last thing printed."""
    stripped = [line.strip() for line in lines]
    for line in reversed(stripped):
        if FAIL_LINE.match(line):
            return line
    for i in range(len(lines) - 1, -1, -1):
        if EXCEPTION_LINE.match(lines[i]):
            return lines[i].strip() + raised_at(lines[:i])
    for line in reversed(stripped):
        if "out of memory" in line.lower():
            return line
    return next((line for line in reversed(stripped) if line), None)


def raised_at(lines: list[str]) -> str:
    """' (train.py line N)': the innermost frame of the last traceback that is in train.py (the agent's code),
    or '' when the traceback does not pass through it."""
    for line in reversed(lines):
        if line.startswith("Traceback (most recent call last)"):
            break
        if (m := FRAME_LINE.match(line)) and m.group(1).endswith("train.py"):
            return f" ({TRAIN} line {m.group(2)})"
    return ""


def read_tail(path: Path, lines: int = TAIL_LINES, max_bytes: int = 256 * 1024) -> list[str]:
    """Last lines of a file without reading all of it."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return []
    return [line[:MAX_LINE_CHARS] for line in re.split(r"\r\n|\r|\n", data.decode(errors="replace"))][-lines:]


class LogReader:
    """Incremental reader of a run's log: new bytes only, split on \\n or \\r (progress bars rewrite one line
    with \\r), keeping the phase and latest progress, the last `---` summary block and the last lines.
    `phases_ended` keeps each recent phase's last progress, numbered by `phase_changes`, so a waiter that reports
    every few seconds still shows a phase shorter than its cadence (a 2 s budget's training)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.partial = ""
        self.progress = empty_progress()
        self.summary: dict = {}
        self.in_summary = False
        self.announced = False  # a `phase:` line was seen: phases are no longer inferred
        self.eval_lines = 0  # `eval:` lines seen (the watchdog measures evaluation throughput from them)
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.phase_changes = 0
        self.phases_ended: collections.deque[dict] = collections.deque(maxlen=2 * len(PHASES))

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, final: bool = False) -> None:
        size = self.size()
        if size - self.offset > MAX_READ_BYTES:
            self.offset, self.partial = size - MAX_READ_BYTES, ""  # lines cut here are lost, the tail matters
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
            self.offset += len(data)
            parts = re.split(r"\r\n|\r|\n", self.partial + data.decode(errors="replace"))
            self.partial = parts.pop()
            if len(self.partial) > MAX_READ_BYTES:  # no newline for a megabyte: treat it as a line
                parts.append(self.partial)
                self.partial = ""
            for line in parts:
                self.line(line)
        if final and self.partial:
            self.line(self.partial)
            self.partial = ""
        elif PROGRESS_LINE.match(self.partial):  # upstream style: "\rstep ..." leaves the newest line unfinished
            self.parse_progress(self.partial)

    def line(self, line: str) -> None:
        self.tail.append(line[:MAX_LINE_CHARS])
        if line.strip() == "---":
            self.summary, self.in_summary = {}, True
            return
        if self.in_summary:
            if m := SUMMARY_LINE.match(line):
                self.summary[m.group(1)] = parse_number(m.group(2))
                return
            self.in_summary = False
        if m := PHASE_LINE.match(line):
            if m.group(1) in SET_BY_LOG:
                self.announced = True
                self.set_phase(m.group(1))
        elif m := EVAL_LINE.match(line):
            done, total = int(m.group(1)), int(m.group(2))
            if total > 0:
                self.set_phase("evaluating")
                self.progress["eval_percent"] = round(100.0 * min(done, total) / total, 1)
                self.eval_lines += 1
        elif PROGRESS_LINE.match(line):
            self.parse_progress(line)

    def set_phase(self, phase: str) -> None:
        if phase != self.progress["phase"]:
            self.phase_changes += 1
            self.phases_ended.append(dict(self.progress))
            self.progress["phase"] = phase
            if phase == "evaluating":
                self.progress["eval_percent"] = 0.0

    def parse_progress(self, line: str) -> None:
        """Best effort: train.py is agent-edited, any field may be missing or malformed."""
        progress = {"step": int(PROGRESS_LINE.match(line).group(1)), "percent": None, "loss": None,
                    "seconds_left": None}
        for key, pattern in (("percent", PERCENT), ("loss", LOSS), ("seconds_left", REMAINING)):
            if m := pattern.search(line):
                try:
                    value = float(m.group(1))
                except ValueError:
                    continue
                progress[key] = value if math.isfinite(value) else None
        self.progress.update(progress)
        phase = self.progress["phase"]
        if phase in ("starting", "compiling"):  # a step line: training has begun (warm-up steps say so first)
            self.set_phase("training")
        if not self.announced and self.progress["phase"] == "training" and self.budget_spent():
            self.set_phase("evaluating")  # an older train.py: after its last step comes the evaluation
            self.progress["eval_percent"] = None

    def budget_spent(self) -> bool:
        p = self.progress
        return (p["percent"] is not None and p["percent"] >= 100.0) or p["seconds_left"] == 0.0
