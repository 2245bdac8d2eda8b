"""The workspace as the agent may see it: which files it can read, how edits apply, input limits, and the
clean environment and frozen-harness facts a training run is started with.
"""

import difflib
import os
import tempfile
import time
from pathlib import Path, PurePosixPath

from server.errors import WorkspaceError
from server.gitops import TRAIN

IN_SCOPE = frozenset({TRAIN, "training/prepare.py", "training/runtime.py", "training/prepare_data.py", "program.md",
                      "README.md"})
ALLOWED = ", ".join(sorted(IN_SCOPE))
# Input limits: generous for real work, small enough that no single call can flood memory, disk or git.
MAX_TRAIN_BYTES = 1_000_000        # a whole train.py (write_train, or the result of an edit)
MAX_EDIT_BYTES = 1_000_000         # old_text / new_text of one edit
MAX_DESCRIPTION_CHARS = 2_000      # a run description, which becomes its commit message
MAX_READ_LINES = 2_000             # lines returned by one read
MAX_LISTED_LINES = 50              # line numbers listed in an "ambiguous edit" error
SIMILAR = 0.6                      # difflib ratio above which a line is offered as a "did you mean"
# The "did you mean" search compares at most this many characters of each line (so one comparison costs a bounded
# amount and the whole search is linear in train.py's size), and gives up after NEAR_MISS_SECONDS.
NEAR_MISS_CHARS = 200
NEAR_MISS_SECONDS = 0.5


# ---- access

def resolve_in_scope(workspace: Path, path: str) -> Path:
    """The workspace file the agent named, if it is one of the in-scope files, else WorkspaceError.

    Checked lexically first (no absolute paths, no `..`), then on disk: an in-scope name that is a symlink must
    resolve to that same file, so nothing outside (or elsewhere inside) the workspace can be reached through it.
    """
    if not isinstance(path, str) or not path or "\0" in path:
        raise WorkspaceError(f"invalid path {path!r}: give one of the in-scope files: {ALLOWED}")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise WorkspaceError(f"absolute paths are refused ({path!r}): give a path relative to the workspace, "
                             f"one of {ALLOWED}")
    if ".." in pure.parts:
        raise WorkspaceError(f"'..' is refused in {path!r}: only these workspace files are in scope: {ALLOWED}")
    rel = pure.as_posix()  # drops "./" and doubled slashes
    if rel not in IN_SCOPE:
        raise WorkspaceError(f"{path!r} is out of scope: only these workspace files can be read: {ALLOWED}")
    root = Path(workspace).resolve()
    try:
        real = (root / rel).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        real = None
    if real != root / rel:
        shown = ("a loop" if real is None else real.relative_to(root).as_posix() if real.is_relative_to(root)
                 else "outside the workspace")
        raise WorkspaceError(f"{rel} is a symlink to {shown}; refused: only the in-scope files themselves "
                             f"({ALLOWED}) can be read or edited")
    return Path(workspace) / rel


def read_in_scope(workspace: Path, path: str = TRAIN) -> str:
    """The text of an in-scope file, read through the path jail (a symlinked train.py is refused, never
    followed): every read of train.py for diffs, hints, pre-flight or resources goes through here."""
    target = resolve_in_scope(workspace, path)
    try:
        return target.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise WorkspaceError(f"{path} does not exist in this workspace") from None


def write_in_scope(workspace: Path, text: str, path: str = TRAIN) -> None:
    """Replace an in-scope file atomically, through the path jail."""
    atomic_write(resolve_in_scope(workspace, path), text)


def check_size(what: str, text: str, max_bytes: int) -> None:
    """Refuse text over the limit, or text that could not be written as UTF-8 (JSON allows lone surrogates)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise WorkspaceError(f"{what} is not valid Unicode text (it contains a lone surrogate)") from None
    if size > max_bytes:
        raise WorkspaceError(f"{what} is {size:,} bytes, over the {max_bytes:,}-byte limit: send a smaller change")


def check_description(description: str) -> str:
    """A run description becomes the commit message and a results.tsv cell: one short, non-empty text."""
    text = description.strip() if isinstance(description, str) else ""
    if not text:
        raise WorkspaceError("the description is empty: say in a few words what this experiment changes")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise WorkspaceError(f"the description is {len(text):,} characters, over the {MAX_DESCRIPTION_CHARS:,} "
                             "limit: keep it to a sentence or two")
    if "\0" in text:
        raise WorkspaceError("the description contains a NUL character: send plain text")
    return text


# ---- reading and editing

def read_numbered(path: Path, offset: int = 1, limit: int = MAX_READ_LINES) -> tuple[str, int]:
    """Lines offset..offset+limit-1 in `cat -n` style under a header saying where they sit in the file,
    and the file's total line count."""
    if offset < 1 or limit < 1:
        raise WorkspaceError(f"offset and limit must be >= 1 (got offset={offset}, limit={limit})")
    if not path.is_file():
        raise WorkspaceError(f"{path.name} does not exist in this workspace")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines:
        return f"{path.name}: empty file (0 lines)", 0
    if offset > len(lines):
        raise WorkspaceError(f"offset {offset} is past the end: {path.name} has {len(lines)} lines")
    shown = lines[offset - 1:offset - 1 + min(limit, MAX_READ_LINES)]
    last = offset + len(shown) - 1
    header = f"{path.name}: lines {offset}-{last} of {len(lines)}"
    if last < len(lines):
        header += f" (read on with offset={last + 1})"
    return "\n".join([header, *(f"{n:>6}\t{line}" for n, line in enumerate(shown, offset))]), len(lines)


def edit_unique(text: str, old: str, new: str) -> tuple[str, int]:
    """Replace the one occurrence of `old` with `new`; returns the new text and the first changed line.

    The edit applies only if `old` occurs exactly once (overlapping occurrences count), so the agent always knows
    which code it changed. Otherwise nothing changes and the error says where to look.
    """
    if not old:
        raise WorkspaceError("old_text is empty: copy the exact lines to replace from read_file")
    if old == new:
        raise WorkspaceError("old_text and new_text are identical: nothing would change")
    check_size("old_text", old, MAX_EDIT_BYTES)
    check_size("new_text", new, MAX_EDIT_BYTES)
    starts = _occurrences(text, old)
    if not starts:
        candidates = "; ".join(f"line {n}: {line[:80]!r}" for n, line in _closest_lines(text, old))
        if not candidates:
            raise WorkspaceError("old_text was not found, and no line resembles its first line. Re-read the file "
                                 "with read_file and copy the text exactly, indentation and whitespace included.")
        raise WorkspaceError(f"old_text was not found. Closest candidates: {candidates}. Re-read those lines with "
                             "read_file and copy them exactly, indentation and whitespace included.")
    if len(starts) > 1:
        lines = sorted(set(_line_numbers(text, starts)))
        listed = ", ".join(map(str, lines[:MAX_LISTED_LINES])) + (" ..." if len(lines) > MAX_LISTED_LINES else "")
        raise WorkspaceError(f"old_text is ambiguous: it occurs {len(starts)} times, at lines {listed}. Include "
                             "more surrounding lines so it matches exactly once.")
    start = starts[0]
    result = text[:start] + new + text[start + len(old):]
    check_size("the edited file", result, MAX_TRAIN_BYTES)
    same = len(os.path.commonprefix([old, new]))  # the first changed line may come after unchanged lines
    return result, text.count("\n", 0, start + same) + 1


def _occurrences(text: str, old: str) -> list[int]:
    starts, i = [], text.find(old)
    while i != -1:
        starts.append(i)
        i = text.find(old, i + 1)
    return starts


def _line_numbers(text: str, positions: list[int]) -> list[int]:
    """1-based line numbers of ascending positions, counting each stretch of text once (linear, not quadratic)."""
    numbers, line, previous = [], 1, 0
    for position in positions:
        line += text.count("\n", previous, position)
        previous = position
        numbers.append(line)
    return numbers


def _closest_lines(text: str, old: str, deadline: float | None = None) -> list[tuple[int, str]]:
    """Up to three (line number, line) most like the first line of `old`: a failed match is usually a
    whitespace or typo slip on one of them. Bounded: each side is cut to NEAR_MISS_CHARS before the quadratic
    ratio(), so the search is linear in train.py's size, and it stops at the deadline with what it has."""
    first = next((line.strip() for line in old.splitlines() if line.strip()), "")[:NEAR_MISS_CHARS]
    if not first:
        return []
    deadline = time.monotonic() + NEAR_MISS_SECONDS if deadline is None else deadline
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(first)  # difflib caches its index of seq2, so the fixed side goes there
    scored = []
    for n, line in enumerate(text.splitlines(), 1):
        if n % 256 == 0 and time.monotonic() > deadline:
            break
        matcher.set_seq1(line.strip()[:NEAR_MISS_CHARS])
        # the cheap upper bounds skip most lines before ratio()
        if matcher.real_quick_ratio() >= SIMILAR and matcher.quick_ratio() >= SIMILAR:
            if (ratio := matcher.ratio()) >= SIMILAR:
                scored.append((-ratio, n, line.strip()))
    return [(n, line) for _, n, line in sorted(scored)[:3]]


def unified_diff(before: str, after: str, path: str, context: int = 3) -> str:
    """The change as `git diff` would show it, so the agent sees exactly what an edit did."""
    lines = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                 f"a/{path}", f"b/{path}", n=context)
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def atomic_write(path: Path, text: str) -> None:
    """Replace a file so that a crash leaves either the old or the new content, never half of each.
    The file keeps its permission bits (train.py may be executable)."""
    data = text.encode("utf-8")
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- the frozen harness and the run environment: server/harness.py (names kept here for older callers)

from server.harness import (  # noqa: E402,F401
    PREPARE, describe_harness, harness_pins, prepare_sha256, training_env)
