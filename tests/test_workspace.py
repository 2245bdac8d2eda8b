"""The workspace as the agent sees it: in-scope files only, exact unique edits, input limits, the clean run
environment, and the frozen-harness facts asked of prepare.py."""

import hashlib
import os
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from server import workspace
from server.errors import WorkspaceError
from server.harness import (PASSTHROUGH_PREFIXES, describe_harness, harness_changes, harness_pins, training_env,
                            warnings)
from server.workspace import (IN_SCOPE, MAX_DESCRIPTION_CHARS, MAX_EDIT_BYTES, MAX_TRAIN_BYTES, atomic_write,
                              check_description, check_size, edit_unique, read_in_scope, read_numbered,
                              resolve_in_scope, unified_diff, write_in_scope)


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training/train.py").write_text("".join(f"line {i}\n" for i in range(1, 31)))
    (tmp_path / "training/prepare.py").write_text("# frozen\n")
    (tmp_path / "program.md").write_text("# program\n")
    return tmp_path


# ---- resolve_in_scope

@pytest.mark.parametrize("path", sorted(IN_SCOPE) + ["./training/train.py", "training//train.py"])
def test_in_scope_files_resolve(ws, path):
    resolved = resolve_in_scope(ws, path)
    assert resolved == ws / Path(path.replace("//", "/")).as_posix().removeprefix("./")


@pytest.mark.parametrize("path", ["training/../training/train.py", "../secret", "training/train.py/.."])
def test_dotdot_is_refused(ws, path):
    with pytest.raises(WorkspaceError, match=r"'\.\.' is refused"):
        resolve_in_scope(ws, path)


def test_absolute_paths_are_refused_even_inside_the_workspace(ws):
    with pytest.raises(WorkspaceError, match="absolute paths are refused"):
        resolve_in_scope(ws, str(ws / "training/train.py"))


@pytest.mark.parametrize("path", [".git/config", "training/other.py", "pyproject.toml", "", "training/train.py\0",
                                  "Training/Train.py", ".autoresearch/ledger.jsonl"])
def test_other_files_are_refused_and_the_error_lists_the_allowed_ones(ws, path):
    with pytest.raises(WorkspaceError) as info:
        resolve_in_scope(ws, path)
    for allowed in IN_SCOPE:
        assert allowed in str(info.value)


def test_symlink_leaving_the_workspace_is_refused(ws, tmp_path_factory):
    secret = tmp_path_factory.mktemp("outside") / "secret.txt"
    secret.write_text("token")
    (ws / "README.md").symlink_to(secret)
    with pytest.raises(WorkspaceError, match="symlink to outside the workspace"):
        resolve_in_scope(ws, "README.md")


def test_symlink_to_an_out_of_scope_file_inside_the_workspace_is_refused(ws):
    (ws / "README.md").symlink_to(ws / ".git-credentials")
    with pytest.raises(WorkspaceError, match=r"symlink to \.git-credentials"):
        resolve_in_scope(ws, "README.md")


def test_symlink_between_in_scope_files_is_refused(ws):
    """Otherwise an edit of train.py could silently rewrite the frozen prepare.py."""
    (ws / "training/train.py").unlink()
    (ws / "training/train.py").symlink_to(ws / "training/prepare.py")
    with pytest.raises(WorkspaceError, match="symlink to training/prepare.py"):
        resolve_in_scope(ws, "training/train.py")


def test_symlinked_directory_leaving_the_workspace_is_refused(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "train.py").write_text("x = 1\n")
    (ws / "training").symlink_to(elsewhere)
    with pytest.raises(WorkspaceError, match="outside the workspace"):
        resolve_in_scope(ws, "training/train.py")


def test_symlink_loop_is_refused(ws):
    (ws / "README.md").symlink_to(ws / "README.md")
    with pytest.raises(WorkspaceError, match="symlink"):
        resolve_in_scope(ws, "README.md")


def test_a_workspace_reached_through_a_symlink_works(ws, tmp_path_factory):
    link = tmp_path_factory.mktemp("links") / "ws"
    link.symlink_to(ws)
    assert resolve_in_scope(link, "training/train.py") == link / "training/train.py"


# ---- read_numbered

def test_read_numbered_is_cat_n_with_a_header(ws):
    text, total = read_numbered(ws / "training/train.py", offset=3, limit=2)
    assert text == "train.py: lines 3-4 of 30 (read on with offset=5)\n     3\tline 3\n     4\tline 4"
    assert total == 30


def test_read_numbered_to_the_end(ws):
    text, _ = read_numbered(ws / "training/train.py", offset=29)
    assert text.splitlines() == ["train.py: lines 29-30 of 30", "    29\tline 29", "    30\tline 30"]


def test_read_numbered_refuses_offsets_past_the_end_and_missing_files(ws):
    with pytest.raises(WorkspaceError, match="past the end: train.py has 30 lines"):
        read_numbered(ws / "training/train.py", offset=31)
    with pytest.raises(WorkspaceError, match=">= 1"):
        read_numbered(ws / "training/train.py", offset=0)
    with pytest.raises(WorkspaceError, match="README.md does not exist"):
        read_numbered(ws / "README.md")


def test_read_numbered_empty_file(ws):
    (ws / "program.md").write_text("")
    assert read_numbered(ws / "program.md") == ("program.md: empty file (0 lines)", 0)


# ---- edit_unique

TRAIN = textwrap.dedent("""\
    DEPTH = 8
    LR = 0.04

    def lr(step):
        return LR * min(1.0, step / 100)

    def wd(step):
        return 0.1 * min(1.0, step / 100)
""")


def test_edit_replaces_the_unique_occurrence():
    new_text, line = edit_unique(TRAIN, "LR = 0.04", "LR = 0.02")
    assert new_text == TRAIN.replace("LR = 0.04", "LR = 0.02")
    assert line == 2


def test_first_changed_line_skips_an_unchanged_prefix():
    _, line = edit_unique(TRAIN, "def lr(step):\n    return LR", "def lr(step):\n    return 2 * LR")
    assert line == 5


def test_not_found_points_at_the_closest_lines():
    with pytest.raises(WorkspaceError) as info:
        edit_unique(TRAIN, "LR = 0.05\n", "LR = 0.02\n")
    message = str(info.value)
    assert "old_text was not found" in message
    assert "line 2: 'LR = 0.04'" in message


def test_not_found_without_any_similar_line():
    with pytest.raises(WorkspaceError, match="no line resembles its first line"):
        edit_unique(TRAIN, "completely unrelated text", "x")


def test_ambiguous_lists_every_line():
    with pytest.raises(WorkspaceError) as info:
        edit_unique(TRAIN, "min(1.0, step / 100)", "1.0")
    assert "occurs 2 times, at lines 5, 8" in str(info.value)


def test_overlapping_occurrences_are_ambiguous():
    with pytest.raises(WorkspaceError, match="occurs 2 times"):
        edit_unique("aaa\n", "aa", "b")


@pytest.mark.parametrize("old, new, match", [("", "x", "empty"), ("LR", "LR", "identical")])
def test_degenerate_edits_are_refused(old, new, match):
    with pytest.raises(WorkspaceError, match=match):
        edit_unique(TRAIN, old, new)


def test_edit_size_limits():
    with pytest.raises(WorkspaceError, match="new_text is 1,000,001 bytes"):
        edit_unique(TRAIN, "LR = 0.04", "x" * (MAX_EDIT_BYTES + 1))
    with pytest.raises(WorkspaceError, match="the edited file"):
        edit_unique("A\n" + "#" * (MAX_TRAIN_BYTES - 10), "A", "B" * 20)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\n x", max_size=60), old=st.text(alphabet="ab\n x", max_size=6),
       new=st.text(max_size=6))
def test_edit_is_exactly_the_replacement_or_an_error(text, old, new):
    """No input corrupts the file: either exactly one occurrence was replaced, or nothing happened."""
    starts = [i for i in range(len(text)) if text.startswith(old, i)]
    try:
        new_text, line = edit_unique(text, old, new)
    except WorkspaceError:
        assert not old or old == new or len(starts) != 1
        return
    assert old and old != new and len(starts) == 1
    start = starts[0]
    assert new_text == text[:start] + new + text[start + len(old):]
    assert 1 <= line <= text.count("\n") + 1


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=200), data=st.data())
def test_edit_of_any_unique_slice_round_trips(text, data):
    """Replacing a unique slice and then replacing it back restores the original text."""
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    old, new = text[start:end], data.draw(st.text(min_size=1, max_size=20))
    if not old or old == new or not occurs_once(text, old):
        return
    edited, _ = edit_unique(text, old, new)
    if occurs_once(edited, new):
        assert edit_unique(edited, new, old)[0] == text


def occurs_once(text, part):
    first = text.find(part)
    return first != -1 and text.find(part, first + 1) == -1


def test_unified_diff_shows_the_edit_like_git():
    before = "a\nb\nc\n"
    assert unified_diff(before, "a\nB\nc\n", "training/train.py") == (
        "--- a/training/train.py\n+++ b/training/train.py\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n")
    assert unified_diff(before, before, "x") == ""
    assert unified_diff("a\n", "a", "x").endswith("+a\n\\ No newline at end of file\n")


def test_atomic_write_replaces_content_and_keeps_the_mode(ws):
    train = ws / "training/train.py"
    train.chmod(0o755)
    atomic_write(train, "print('hi')\n")
    assert train.read_text() == "print('hi')\n"
    assert train.stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in train.parent.iterdir()) == ["prepare.py", "train.py"]  # no temp file left


def test_atomic_write_failure_leaves_the_old_file(ws, monkeypatch):
    train = ws / "training/train.py"
    before = train.read_text()
    monkeypatch.setattr("server.workspace.os.replace", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(train, "new")
    assert train.read_text() == before
    assert sorted(p.name for p in train.parent.iterdir()) == ["prepare.py", "train.py"]


# ---- limits

def test_description_limits():
    assert check_description("  try a deeper model \n") == "try a deeper model"
    for bad, match in [("", "empty"), ("  \n", "empty"), ("x" * (MAX_DESCRIPTION_CHARS + 1), "2,001 characters"),
                       ("a\0b", "NUL")]:
        with pytest.raises(WorkspaceError, match=match):
            check_description(bad)


def test_lone_surrogates_are_refused():
    with pytest.raises(WorkspaceError, match="not valid Unicode"):
        check_size("content", "x\ud800", MAX_TRAIN_BYTES)


# ---- run environment

def test_training_env_is_built_from_scratch(ws, monkeypatch):
    for key in [k for k in os.environ if k.startswith(PASSTHROUGH_PREFIXES)]:
        monkeypatch.delenv(key)  # whatever this test process happens to carry is not the point here
    monkeypatch.setenv("AUTORESEARCH_RESULT_FILE", "/tmp/attacker.json")
    monkeypatch.setenv("AUTORESEARCH_PROFILE", "gpu")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("PATH", "/usr/bin")
    env = training_env(ws, profile="smoke", dataset="sotu", cache=Path("cache"), budget=10.0,
                       result_file=Path(".autoresearch/runs/r0001/result.json"), seed=7)
    assert env == {
        "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        **{k: os.environ[k] for k in ("HOME", "LANG", "LC_ALL", "TMPDIR", "USER") if k in os.environ},
        "AUTORESEARCH_PROFILE": "smoke", "AUTORESEARCH_DATASET": "sotu", "AUTORESEARCH_CACHE": str(ws / "cache"),
        "AUTORESEARCH_TIME_BUDGET": "10", "AUTORESEARCH_RESULT_FILE": str(ws / ".autoresearch/runs/r0001/result.json"),
        "AUTORESEARCH_SEED": "7", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": str((ws / "training").resolve()),  # the harness, importable from the run's own folder
    }


def test_training_env_leaves_unset_choices_to_prepare(ws, monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_DATASET", "climbmix")
    env = training_env(ws, profile=None, dataset=None, cache=None, budget=None, result_file=Path("/r.json"), seed=None)
    assert {k for k in env if k.startswith("AUTORESEARCH_")} == {"AUTORESEARCH_RESULT_FILE", "AUTORESEARCH_SEED"} - {
        "AUTORESEARCH_SEED"}
    assert env["AUTORESEARCH_RESULT_FILE"] == "/r.json"


# ---- the harness, asked in a subprocess

FAKE_PREPARE = textwrap.dedent("""\
    import json, os, sys
    if "--profile=bogus" in sys.argv:
        print("unknown profile 'bogus': choose gpu, small, cpu or smoke", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"argv": sys.argv[1:], "profile": {"name": os.environ.get("AUTORESEARCH_PROFILE")},
                      "dataset": os.environ.get("AUTORESEARCH_DATASET"), "val_fingerprint": "abc",
                      "leaked": sorted(k for k in os.environ if k.startswith(("FAKE_", "AUTORESEARCH_RESULT")))}))
""")


def test_describe_harness_runs_prepare_with_a_clean_env(ws, monkeypatch):
    (ws / "training/prepare.py").write_text(FAKE_PREPARE)
    monkeypatch.setenv("FAKE_MODE", "leak")
    described = describe_harness(ws, "smoke", "sotu", ws / "cache")
    assert described["argv"] == ["--describe", "--profile=smoke", "--dataset=sotu"]
    assert described["profile"] == {"name": "smoke"}
    assert described["leaked"] == []


def test_describe_harness_error_has_stderr_and_the_command(ws):
    (ws / "training/prepare.py").write_text(FAKE_PREPARE)
    with pytest.raises(WorkspaceError) as info:
        describe_harness(ws, "bogus", None, ws / "cache")
    message = str(info.value)
    assert "exit 2" in message and "unknown profile 'bogus'" in message
    assert f"{sys.executable} training/prepare.py --describe --profile=bogus" in message
    assert "AUTORESEARCH_PROFILE=bogus" in message


def test_describe_harness_refuses_non_json_output(ws):
    (ws / "training/prepare.py").write_text("print('hello')\n")
    with pytest.raises(WorkspaceError, match="(?s)did not print one JSON object.*hello"):
        describe_harness(ws, None, None, None)


def test_describe_harness_without_prepare(tmp_path):
    with pytest.raises(WorkspaceError, match="autoresearch-mcp init"):
        describe_harness(tmp_path, None, None, None)


def test_harness_pins(ws):
    (ws / "training/runtime.py").write_text("# runtime\n")
    pins = harness_pins(ws, {"profile": {"name": "cpu", "max_seq_len": 256}, "val_fingerprint": "f00",
                             "eval_rows": 64, "eval_tokens_scored": 16384, "epochs_per_budget": 2.5})
    sha = hashlib.sha256(b"# frozen\n").hexdigest()
    assert pins == {"prepare_sha256": sha,
                    "harness_sha256": {"training/prepare.py": sha,
                                       "training/runtime.py": hashlib.sha256(b"# runtime\n").hexdigest()},
                    "profile": {"name": "cpu", "max_seq_len": 256}, "val_fingerprint": "f00",
                    "amounts": {"rows_evaluated": 64, "tokens_evaluated": 16384}}
    assert harness_changes(ws, pins) == []
    (ws / "training/prepare_data.py").write_text("# appeared\n")
    (ws / "training/runtime.py").write_text("# edited\n")
    assert harness_changes(ws, pins) == ["training/prepare_data.py", "training/runtime.py"]
    # a session pinned before runtime.py was pinned checks prepare.py alone
    assert harness_changes(ws, {"prepare_sha256": sha}) == []


def test_too_many_epochs_per_budget_is_a_warning():
    assert warnings({"epochs_per_budget": 3.9, "dataset": "sotu"}) == []
    assert warnings({}) == []
    [warning] = warnings({"epochs_per_budget": 12.4, "dataset": "sotu"})
    assert "about 12 times" in warning and "larger dataset" in warning


# ---- the near-miss search is bounded


def count_ratio_calls(monkeypatch) -> list[tuple[int, int]]:
    """Record the sizes of the two sides of every quadratic difflib comparison the near-miss search makes."""
    calls = []
    original = workspace.difflib.SequenceMatcher.ratio

    def ratio(self):
        calls.append((len(self.a), len(self.b)))
        return original(self)
    monkeypatch.setattr(workspace.difflib.SequenceMatcher, "ratio", ratio)
    return calls


@pytest.mark.parametrize("shape", ["one long line", "many similar lines"])
def test_the_near_miss_search_is_linear_in_the_file_size(monkeypatch, shape):
    calls = count_ratio_calls(monkeypatch)
    work = []
    for size in (8_000, 64_000):
        calls.clear()
        if shape == "one long line":
            text, old = "ab" * (size // 2), "ab" * (size // 2 - 1) + "x"
        else:
            text, old = "value = compute(x, y)\n" * (size // 22), "value = compute(x, z)\n"
        with pytest.raises(WorkspaceError, match="not found"):
            edit_unique(text, old, "new")
        assert all(a <= workspace.NEAR_MISS_CHARS and b <= workspace.NEAR_MISS_CHARS for a, b in calls)
        work.append(sum(a * b for a, b in calls) + size)  # the quadratic part is bounded per line
    assert work[1] <= 8 * work[0] * 1.1  # 8x the text costs at most ~8x the work, not 64x


def test_the_near_miss_search_stops_at_its_deadline():
    text = "total = compute(a, b)\n" * 10_000 + "value = compute(x, y)\n" * 3  # the best lines come last
    unbounded = workspace._closest_lines(text, "value = compute(x, z)", deadline=float("inf"))
    assert [n for n, _ in unbounded] == [10_001, 10_002, 10_003]
    # past its deadline, the search stops within one block of lines and answers with what it has
    assert all(n <= 256 for n, _ in workspace._closest_lines(text, "value = compute(x, z)", deadline=0.0))


# ---- train.py only through the path jail


def test_a_symlinked_train_py_is_never_read_or_written_through(ws, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    (ws / "training/train.py").unlink()
    (ws / "training/train.py").symlink_to(secret)
    for attempt in (lambda: read_in_scope(ws), lambda: write_in_scope(ws, "x = 1\n")):
        with pytest.raises(WorkspaceError, match="symlink") as info:
            attempt()
        assert "top secret" not in str(info.value)
    assert secret.read_text() == "top secret\n" and (ws / "training/train.py").is_symlink()


def test_the_runtime_is_readable_but_not_the_rest_of_training(ws):
    (ws / "training/runtime.py").write_text("def detect_device(): ...\n")
    assert "detect_device" in read_in_scope(ws, "training/runtime.py")
    assert "training/runtime.py" in IN_SCOPE
    with pytest.raises(WorkspaceError, match="out of scope"):
        resolve_in_scope(ws, "training/other.py")
