"""The ledger: an append-only, fsynced JSON-lines file that survives torn writes and concurrent writers, folds
run records by id, and rebuilds results.tsv in upstream's format after every append."""

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from hypothesis import given, settings, strategies as st

import server.ledger
from server.ledger import TSV_HEADER, Ledger

REPO = Path(__file__).resolve().parents[1]


def run_record(run_id, **fields):
    return {"type": "run", "id": run_id, "session": "mar5", **fields}


def without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_append_creates_the_state_dir_and_stamps_the_time(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append({"type": "session", "tag": "mar5"})
    assert ledger.path == tmp_path / ".autoresearch/ledger.jsonl"
    (record,) = ledger.records()
    assert record["tag"] == "mar5"
    assert datetime.fromisoformat(record["time"]).utcoffset().total_seconds() == 0
    assert ledger.path.read_bytes().count(b"\n") == 1


def test_append_keeps_a_given_time(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append({"type": "note", "time": "2025-01-01T00:00:00+00:00"})
    assert ledger.records()[0]["time"] == "2025-01-01T00:00:00+00:00"


def test_empty_ledger(tmp_path):
    ledger = Ledger(tmp_path)
    assert ledger.records() == [] and ledger.runs() == [] and ledger.damaged_lines == []
    assert ledger.session() is None and ledger.run("r0001") is None and ledger.next_run_id() == "r0001"


def test_runs_fold_updates_by_id_in_start_order(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append(run_record("r0001", status="running", val_bpb=None, description="baseline"))
    ledger.append(run_record("r0002", status="running", session="other"))
    ledger.append(run_record("r0001", status="succeeded", val_bpb=0.99))
    ledger.append({"type": "session", "tag": "mar5"})
    ledger.append(run_record("r0001", decision="keep"))
    runs = ledger.runs()
    assert [r["id"] for r in runs] == ["r0001", "r0002"]
    assert without_time([runs[0]]) == [run_record("r0001", status="succeeded", val_bpb=0.99, description="baseline",
                                                  decision="keep")]
    assert [r["id"] for r in ledger.runs("other")] == ["r0002"]
    assert ledger.run("r0002")["session"] == "other" and ledger.run("r0003") is None


def test_next_run_id_counts_across_sessions(tmp_path):
    ledger = Ledger(tmp_path)
    for i in range(1, 11):
        ledger.append(run_record(f"r{i:04d}", session=f"s{i % 2}"))
    ledger.append(run_record("custom"))
    assert ledger.next_run_id() == "r0011"


def test_latest_session_and_noise(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append({"type": "session", "tag": "a"})
    ledger.append({"type": "noise", "profile": "cpu", "dataset": "sotu", "std": 0.01})
    ledger.append({"type": "session", "tag": "b"})
    ledger.append({"type": "noise", "profile": "cpu", "dataset": "sotu", "std": 0.02})
    ledger.append({"type": "noise", "profile": "gpu", "dataset": "sotu", "std": 0.03})
    assert ledger.session()["tag"] == "b"
    assert ledger.noise("cpu", "sotu")["std"] == 0.02
    assert ledger.noise("cpu", "climbmix") is None


def test_records_are_copies(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append(run_record("r0001", status="running"))
    ledger.records()[0]["status"] = "mangled"
    ledger.runs()[0]["status"] = "mangled"
    assert ledger.run("r0001")["status"] == "running"


# ---- damage

def test_torn_last_line_is_reported_and_the_next_record_is_not_lost(tmp_path, caplog):
    ledger = Ledger(tmp_path)
    ledger.append(run_record("r0001", status="running"))
    with open(ledger.path, "ab") as f:
        f.write(b'{"type": "run", "id": "r0001", "sta')  # power cut mid-write
    assert [r["status"] for r in ledger.records()] == ["running"]
    assert ledger.damaged_lines == [2]
    assert "line 2 is damaged" in caplog.text
    ledger.append(run_record("r0002", status="running"))
    assert [r["id"] for r in ledger.records()] == ["r0001", "r0002"]
    assert ledger.damaged_lines == [2]
    assert ledger.path.read_bytes().endswith(b'"sta\n' + json.dumps(ledger.records()[1]).encode() + b"\n")


def test_a_last_record_missing_only_its_newline_is_kept(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.path.parent.mkdir()
    ledger.path.write_bytes(json.dumps(run_record("r0001")).encode())
    assert [r["id"] for r in ledger.records()] == ["r0001"] and ledger.damaged_lines == []
    ledger.append(run_record("r0002"))
    assert [r["id"] for r in ledger.records()] == ["r0001", "r0002"] and ledger.damaged_lines == []


def test_garbage_lines_are_skipped(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.path.parent.mkdir()
    lines = [json.dumps(run_record("r0001")).encode(), b"\xff\xfe not utf-8", b"[1, 2]", b"", b"   ", b"{bad json",
             b"42", json.dumps(run_record("r0002")).encode()]
    ledger.path.write_bytes(b"\n".join(lines) + b"\n")
    assert [r["id"] for r in ledger.records()] == ["r0001", "r0002"]
    assert ledger.damaged_lines == [2, 3, 6, 7]


def test_results_tsv_survives_odd_field_types(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append(run_record("r0001", commit=None, val_bpb="n/a", metrics=["not", "a", "dict"], description=None))
    assert ledger.results_path.read_text() == TSV_HEADER + "\t0.000000\t0.0\tcrash\t\n"


# ---- caching and other writers

def test_sees_appends_by_another_writer(tmp_path):
    reader, writer = Ledger(tmp_path), Ledger(tmp_path)
    writer.append(run_record("r0001"))
    assert len(reader.records()) == 1
    writer.append(run_record("r0002"))
    assert [r["id"] for r in reader.records()] == ["r0001", "r0002"]


def test_parses_only_what_was_appended(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path)
    ledger.path.parent.mkdir()
    ledger.path.write_text("".join(json.dumps(run_record(f"r{i:04d}", status="running")) + "\n"
                                   for i in range(1, 1201)))
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(server.ledger.json, "loads", lambda s: parsed.append(s) or real_loads(s))
    assert len(ledger.runs()) == 1200 and len(parsed) == 1200
    ledger.records()
    assert len(parsed) == 1200  # unchanged file: nothing re-parsed
    ledger.append(run_record("r0001", status="succeeded"))
    assert len(parsed) == 1201  # the append (and its results.tsv rebuild) parsed one new line
    assert ledger.run("r0001")["status"] == "succeeded" and len(parsed) == 1201


def test_a_replaced_or_truncated_file_is_reread(tmp_path):
    ledger = Ledger(tmp_path)
    for i in range(1, 4):
        ledger.append(run_record(f"r{i:04d}"))
    assert len(ledger.records()) == 3
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps(run_record("r0009")) + "\n")
    os.replace(replacement, ledger.path)
    assert [r["id"] for r in ledger.records()] == ["r0009"]
    ledger.path.write_text("")
    assert ledger.records() == []


WRITER = """
import sys
from pathlib import Path
from server.ledger import Ledger
ledger = Ledger(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    ledger.append({"type": "run", "id": f"{sys.argv[2]}{i}", "pad": "x" * 8000})
"""


def test_two_processes_appending_at_once_lose_nothing(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, "150"], env=env)
               for name in ("a", "b")]
    assert [w.wait() for w in writers] == [0, 0]
    ledger = Ledger(tmp_path)
    ids = [r["id"] for r in ledger.records()]
    assert ledger.damaged_lines == []
    assert sorted(ids) == sorted(f"{name}{i}" for name in "ab" for i in range(150))
    assert [i for i in ids if i.startswith("a")] == [f"a{i}" for i in range(150)]
    assert len(ledger.results_path.read_text().splitlines()) == 301


# ---- results.tsv

def test_results_tsv_is_upstream_format_for_the_current_session(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append({"type": "session", "tag": "old"})
    ledger.append(run_record("r0001", session="old", commit="a" * 40, status="succeeded", val_bpb=1.1))
    ledger.append({"type": "session", "tag": "mar5"})
    sha = "0123456789abcdef" * 2 + "01234567"
    rows = [
        run_record("r0002", commit=sha, status="succeeded", val_bpb=0.9979, metrics={"peak_vram_mb": 45060.2},
                   decision="keep", description="baseline"),
        run_record("r0003", commit=sha, status="succeeded", val_bpb=1.0012, metrics={"peak_vram_mb": 46080},
                   decision="discard", description="tabs\tand\nnewlines"),
        run_record("r0004", commit=sha, status="crashed", val_bpb=None, description="OOM"),
        run_record("r0005", commit=sha, status="timed_out", description="slow"),
        run_record("r0006", commit=sha, status="succeeded", val_bpb=0.99, description="undecided"),
        run_record("r0007", commit=sha, status="succeeded", val_bpb=0.98, kind="noise", decision="discard",
                   description="noise floor: seed 43"),
        run_record("r0008", commit=sha, status="running", description="in flight"),
    ]
    for row in rows:
        ledger.append(row)
    assert ledger.results_path.read_text() == TSV_HEADER + (
        "0123456\t0.997900\t44.0\tkeep\tbaseline\n"
        "0123456\t1.001200\t45.0\tdiscard\ttabs and newlines\n"
        "0123456\t0.000000\t0.0\tcrash\tOOM\n"
        "0123456\t0.000000\t0.0\tcrash\tslow\n"
        "0123456\t0.990000\t0.0\tpending\tundecided\n"
        "0123456\t0.980000\t0.0\tdiscard\tnoise floor: seed 43\n"  # nothing hidden: noise runs are rows too
        "0123456\t0.000000\t0.0\trunning\tin flight\n")
    assert sorted(p.name for p in ledger.dir.iterdir()) == ["ledger.jsonl"]  # no temp file left behind


def test_results_tsv_follows_updates_of_a_run(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append(run_record("r0001", commit="b" * 40, status="running", description="x"))
    assert ledger.results_path.read_text().endswith("\trunning\tx\n")
    ledger.append(run_record("r0001", status="succeeded", val_bpb=1.0))
    assert ledger.results_path.read_text().endswith("\t1.000000\t0.0\tpending\tx\n")
    ledger.append(run_record("r0001", decision="discard"))
    assert ledger.results_path.read_text().endswith("\tdiscard\tx\n")


def test_results_tsv_without_a_session_lists_every_run(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.append(run_record("r0001", session="a", commit="c" * 40, status="running"))
    ledger.append(run_record("r0002", session="b", commit="d" * 40, status="running"))
    assert len(ledger.results_tsv().splitlines()) == 3


# ---- properties: no input corrupts the ledger

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
records = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
operations = st.lists(st.one_of(st.tuples(st.just("append"), records),
                                st.tuples(st.just("garbage"), st.binary(max_size=40)),
                                st.tuples(st.just("read"), st.none())), max_size=15)


def is_subsequence(part, whole):
    remaining = iter(whole)
    return all(any(item == other for other in remaining) for item in part)


@settings(max_examples=150, deadline=None)
@given(ops=operations)
def test_appended_records_survive_any_interleaved_garbage(tmp_path_factory, ops):
    """Torn writes and garbage between appends never make the reader raise or drop an appended record, and the
    incremental reader always agrees with a fresh one."""
    ledger = Ledger(tmp_path_factory.mktemp("ws"))
    appended = []
    for op, value in ops:
        if op == "append":
            ledger.append(value)
            appended.append(value)
        elif op == "garbage":
            ledger.path.parent.mkdir(exist_ok=True)
            with open(ledger.path, "ab") as f:
                f.write(value)
        else:
            ledger.records()
    got = ledger.records()
    assert is_subsequence(without_time(appended), without_time(got))
    fresh = Ledger(ledger.workspace)
    assert fresh.records() == got and fresh.damaged_lines == ledger.damaged_lines


@settings(max_examples=200, deadline=None)
@given(content=st.binary(max_size=300))
def test_reader_never_raises_on_arbitrary_bytes(tmp_path_factory, content):
    ledger = Ledger(tmp_path_factory.mktemp("ws"))
    ledger.path.parent.mkdir()
    ledger.path.write_bytes(content)
    got = ledger.records()
    assert all(isinstance(r, dict) for r in got)
    assert all(1 <= n <= content.count(b"\n") + 1 for n in ledger.damaged_lines)
    ledger.results_tsv()


def test_where_a_run_ran_names_its_node_only_when_the_runs_span_several():
    from server.ledger import ran_on

    local = [{"device": "cpu:0", "node": "laptop"}, {"device": "cpu:1", "node": "laptop"}]
    assert [ran_on(r, local) for r in local] == ["cpu:0", "cpu:1"]
    cluster = [{"device": "cuda:0", "node": "a"}, {"device": "cuda:0", "node": "b"}, {"id": "old record"}]
    assert [ran_on(r, cluster) for r in cluster] == ["a/cuda:0", "b/cuda:0", None]
