"""For the human in the morning: the results table and the progress chart, straight from the ledger."""

import sys
from pathlib import Path

from server.errors import WorkspaceError
from server.gitops import Git
from server.ledger import Ledger, ran_on, row_status
from server.plot import progress_png


def pick_session(workspace: Path, ledger: Ledger, tag: str | None) -> dict:
    """The named session, else the one on the checked-out branch, else the newest."""
    sessions = [r for r in ledger.records() if r.get("type") == "session"]
    if not sessions:
        raise WorkspaceError(f"No research session is recorded in {workspace}/.autoresearch/ledger.jsonl yet.")
    if tag:
        named = [s for s in sessions if s["tag"] == tag]
        if not named:
            raise WorkspaceError(f"No session {tag!r}. Known: {', '.join(sorted({s['tag'] for s in sessions}))}.")
        return named[-1]
    branch = Git(workspace).branch()
    on_branch = [s for s in sessions if s["branch"] == branch]
    return (on_branch or sessions)[-1]


def table_status(run: dict) -> str:
    """A failure as the server recorded it (crashed, timed_out, cancelled, interrupted): the person reading the
    table needs to know a run ran out of time rather than broke. A success shows its decision, as results.tsv
    does (results.tsv itself keeps upstream's keep/discard/crash)."""
    status = run.get("status")
    return status if status not in ("succeeded", None) else row_status(run)


def fmt_bpb(value) -> str:
    return f"{value:.6f}" if isinstance(value, (int, float)) else "-"


def print_results(workspace: Path, tag: str | None, limit: int, show_diff: bool) -> int:
    ledger = Ledger(workspace)
    session = pick_session(workspace, ledger, tag)
    runs = ledger.runs(session["tag"])
    print(f"session {session['tag']} (branch {session['branch']}, profile {session.get('profile')}, "
          f"dataset {session.get('dataset')}): {len(runs)} runs")
    shown = runs[-limit:] if limit else runs
    where = {run["id"]: ran_on(run, runs) or "-" for run in shown}
    width = max([8, *map(len, where.values())])
    print(f"{'run':<7} {'commit':<8} {'val_bpb':>9} {'mem_gb':>7} {'status':<11} {'device':<{width}} description")
    for run in shown:
        memory = (run.get("metrics") or {}).get("peak_vram_mb")
        memory_text = f"{memory / 1024:.1f}" if isinstance(memory, (int, float)) else "-"
        print(f"{run['id']:<7} {str(run.get('commit') or '')[:7]:<8} {fmt_bpb(run.get('val_bpb')):>9} "
              f"{memory_text:>7} {table_status(run):<11} {where[run['id']]:<{width}} "
              f"{run.get('description', '')}")
    kept = [r for r in runs if r.get("decision") == "keep" and r.get("val_bpb") is not None]
    if not kept:
        print("\nno kept run yet")
        return 0
    best = min(kept, key=lambda r: r["val_bpb"])
    baseline = kept[0]
    print(f"\nbest: {best['id']} val_bpb {best['val_bpb']:.6f} "
          f"({best['val_bpb'] - baseline['val_bpb']:+.6f} against the first kept run {baseline['id']})")
    chain = kept[1:kept.index(best) + 1]
    if chain:
        print("built from these kept changes:")
        for run in chain:
            print(f"  {run['id']} {run['commit'][:7]} {run['val_bpb']:.6f}  {run.get('description', '')}")
    if show_diff:
        diff = Git(workspace).diff_between(session["base_commit"], best["commit"])
        sys.stdout.write("\n" + (diff or "(train.py is unchanged from the session's start)\n"))
    return 0


def write_plot(workspace: Path, tag: str | None, output: Path) -> int:
    ledger = Ledger(workspace)
    session = pick_session(workspace, ledger, tag)
    output.write_bytes(progress_png(ledger.runs(session["tag"])))
    print(f"wrote {output} ({len(ledger.runs(session['tag']))} runs of session {session['tag']})")
    return 0
