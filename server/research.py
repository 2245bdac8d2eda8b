"""The research loop as plain methods: session, edits, runs, keep/discard, results.

The MCP layer (app.py) and the CLI both sit on this class; nothing here knows about MCP. Every refusal is a
WorkspaceError whose message says what was wrong and what to do.
"""

import functools
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio

from server import harness, layout
from server import workspace as ws
from server.errors import WorkspaceError
from server.gitops import TRAIN, Git
from server.ledger import Ledger, now_iso, row_status
from server.models import (
    Decision,
    DiffResult,
    EditResult,
    FileText,
    LogText,
    NoiseFloor,
    ResultRow,
    Results,
    RunProgress,
    RunResult,
    SessionInfo,
    Status,
)
from server.preflight import preflight
from server.runs import RunManager
from server.wslock import ServerClaim, WorkspaceLock

DEFAULT_SEED = 42
NOISE_SIGMAS = 2.0  # a change smaller than this many sigmas of seed noise is not evidence of anything
FINISHED = {"succeeded", "crashed", "timed_out", "cancelled", "interrupted"}
IN_FLIGHT = {"starting", "running"}


def state_change(method):
    """Run a Research method under the workspace lock: one state change at a time, across threads and processes,
    each re-reading the ledger and git inside the lock before it decides."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock.held():
            return method(self, *args, **kwargs)
    return locked


@dataclass
class Settings:
    """What the server was started with; None means the harness default."""

    workspace: Path
    profile: str | None = None
    dataset: str | None = None
    cache: Path | None = None
    budget_seconds: float | None = None
    python: str = sys.executable
    timeout_seconds: float | None = None  # hard-kill override, for tests


def default_cache() -> Path:
    return Path.home() / ".cache" / "autoresearch"


class Research:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.workspace.resolve()
        if not (self.root / ".git").exists():
            raise WorkspaceError(
                f"{self.root} is not a git repository. Create a workspace with `autoresearch-mcp init DIR` "
                "or point --workspace at a clone of autoresearch-mcp."
            )
        self.cache = (settings.cache or default_cache()).expanduser().resolve()
        self.ledger = Ledger(self.root)
        self.git = Git(self.root)
        self.lock = WorkspaceLock(self.root)
        self.server_claim = ServerClaim(self.root)
        self._harness: dict | None = None
        self._runs: RunManager | None = None

    # ---------------------------------------------------------------- harness facts (prepare.py --describe)

    @property
    def harness(self) -> dict:
        """Profile, dataset, device and readiness as the frozen harness reports them (asked once, then cached)."""
        if self._harness is None:
            self._harness = harness.describe_harness(
                self.root, self.settings.profile, self.settings.dataset, self.cache
            )
        return self._harness

    @property
    def profile_name(self) -> str:
        return self.harness["profile"]["name"]

    @property
    def dataset(self) -> str:
        return self.harness["dataset"]

    @property
    def budget_seconds(self) -> float:
        profile_budget = float(self.harness["profile"]["time_budget"])
        if self.settings.budget_seconds is None:
            return profile_budget
        return min(profile_budget, self.settings.budget_seconds)

    def data_ready(self) -> bool:
        return Path(self.harness["ready_marker"]).exists()

    def prepare_command(self) -> str:
        return f"autoresearch-mcp prepare --dataset {self.dataset} --profile {self.profile_name}"

    @property
    def runs(self) -> RunManager:
        if self._runs is None:
            self._runs = RunManager(
                self.root,
                self.ledger,
                self.git,
                profile=self.profile_name,
                dataset=self.dataset,
                cache=self.cache,
                budget_seconds=self.budget_seconds,
                python=self.settings.python,
                device=self.harness["device"],
                timeout_seconds=self.settings.timeout_seconds,
            )
        return self._runs

    def claim(self) -> None:
        """Become the one server of this workspace (WorkspaceError naming the other one if it is served)."""
        self.server_claim.claim()

    def release(self) -> None:
        self.server_claim.release()

    @state_change
    def recover(self) -> list[str]:
        """Settle runs a previous server left behind (killed mid-run): kill orphans, record them interrupted."""
        return self.runs.recover()

    def warnings(self) -> list[str]:
        return harness.warnings(self.harness)

    def shutdown(self) -> None:
        """At server exit: stop the run in progress and record it interrupted."""
        if self._runs is not None:
            self._runs.shutdown()

    # ---------------------------------------------------------------- session state derived from the ledger

    def session(self) -> dict | None:
        """The latest session record whose branch is checked out now."""
        branch = self.git.branch()
        sessions = [r for r in self.ledger.records() if r.get("type") == "session" and r.get("branch") == branch]
        return sessions[-1] if sessions else None

    def require_session(self) -> dict:
        session = self.session()
        if session is None:
            raise WorkspaceError(
                f"No research session is active on branch {self.git.branch()!r}. "
                "Call start_session(tag) first (or start_session(tag, resume=true) to continue one)."
            )
        return session

    def session_runs(self, session: dict) -> list[dict]:
        return self.ledger.runs(session["tag"])

    def kept(self, session: dict, runs: list[dict]) -> tuple[str, float | None]:
        """The baseline: the newest kept run's commit and val_bpb, else the commit the session started from."""
        for run in reversed(runs):
            if run.get("decision") == "keep":
                return run["commit"], run.get("val_bpb")
        return session["base_commit"], None

    def best(self, runs: list[dict]) -> dict | None:
        kept = [r for r in runs if r.get("decision") == "keep" and r.get("val_bpb") is not None]
        return min(kept, key=lambda r: r["val_bpb"]) if kept else None

    def undecided(self, runs: list[dict]) -> dict | None:
        """A succeeded run nobody has kept or discarded yet (the loop stalls until someone does)."""
        for run in runs:
            if run.get("status") == "succeeded" and run.get("decision") is None:
                return run
        return None

    def noise_floor(self, profile: str, dataset: str) -> NoiseFloor | None:
        record = self.ledger.noise(profile, dataset)
        if record is None:
            return None
        return NoiseFloor(
            std=record["std"], mean=record["mean"], repeats=len(record["values"]), commit=record["commit"]
        )

    # ---------------------------------------------------------------- tools: look

    def status(self) -> Status:
        session = self.session()
        runs = self.session_runs(session) if session else []
        kept_commit, kept_bpb = self.kept(session, runs) if session else (None, None)
        best = self.best(runs)
        current = self.runs.current()
        pending = self.undecided(runs)
        return Status(
            workspace=str(self.root),
            branch=self.git.branch(),
            head=self.git.head(),
            session=session["tag"] if session else None,
            kept_commit=kept_commit,
            kept_val_bpb=kept_bpb,
            best_val_bpb=best["val_bpb"] if best else None,
            run_in_progress=self.run_result(self.ledger.run(current.run_id), runs) if current else None,
            awaiting_decision=pending["id"] if pending else None,
            profile=self.harness["profile"],
            dataset=self.dataset,
            budget_seconds=self.budget_seconds,
            data_ready=self.data_ready(),
            prepare_command=self.prepare_command(),
            device=self.harness["device"],
            train_py_modified=self.git.train_changed(),
            noise_floor=self.noise_floor(self.profile_name, self.dataset),
            runs=len(runs),
            ledger_damaged_lines=self.ledger.damaged_lines,
            warnings=self.warnings(),
        )

    def read_file(self, path: str, offset: int, limit: int) -> FileText:
        target = ws.resolve_in_scope(self.root, path)
        text, total = ws.read_numbered(target, offset, limit)
        return FileText(path=target.relative_to(self.root).as_posix(), text=text, total_lines=total)

    def diff_train(self) -> DiffResult:
        session = self.require_session()
        ws.resolve_in_scope(self.root, TRAIN)  # git would show where a symlinked train.py points
        base, _ = self.kept(session, self.session_runs(session))
        return DiffResult(base=base, diff=self.git.diff_train(base))

    def results(self, limit: int) -> Results:
        session = self.require_session()
        runs = self.session_runs(session)
        best = self.best(runs)
        return Results(
            rows=[self.result_row(r) for r in runs[-limit:]],
            total=len(runs),
            best=self.result_row(best) if best else None,
            noise_floor=self.noise_floor(session["profile"], session["dataset"]),
        )

    def read_log(self, run_id: str, tail: int) -> LogText:
        run = self.require_run(run_id)
        log = layout.log_path(self.root, run["id"])
        if not log.exists():
            raise WorkspaceError(f"Run {run_id} has no log file ({log}); it may have failed before starting.")
        lines = log.read_text(errors="replace").splitlines()
        shown = lines[-tail:] if tail else []
        return LogText(run_id=run["id"], text="\n".join(shown), lines=len(shown), total_lines=len(lines))

    def require_run(self, run_id: str) -> dict:
        run = self.ledger.run(run_id)
        if run is None:
            raise WorkspaceError(f"No run {run_id!r} in the ledger. Call results() to list the run ids.")
        return run

    # ---------------------------------------------------------------- tools: session and edits

    @state_change
    def start_session(self, tag: str, resume: bool) -> SessionInfo:
        self.git.validate_tag(tag)
        branch = f"autoresearch/{tag}"
        if self.runs.current() is not None:
            raise WorkspaceError("A run is in progress; wait for it or cancel it before switching sessions.")
        if self.git.branch_exists(branch):
            if not resume:
                raise WorkspaceError(
                    f"Branch {branch} already exists. Call start_session({tag!r}, resume=true) to continue it, "
                    "or choose a new tag (e.g. today's date plus a letter)."
                )
            if self.git.branch() != branch:
                self.git.ensure_clean_for_checkout()
                self.git.checkout(branch)
            session = self.session()
            if session is None:
                self.ledger.append(self.session_record(tag, branch, self.git.head()))
            resumed = True
        else:
            if resume:
                raise WorkspaceError(f"There is no session {tag!r} to resume (no branch {branch}). Drop resume=true.")
            self.git.create_branch(branch)
            self.ledger.append(self.session_record(tag, branch, self.git.head()))
            resumed = False
        session = self.require_session()
        ready = self.data_ready()
        if not ready:
            next_step = f"Data is not prepared. Ask the human to run: {self.prepare_command()} — then run the baseline."
        elif not self.session_runs(session):
            next_step = 'Run the baseline first: run_experiment("baseline") with train.py unchanged, then keep it.'
        else:
            next_step = "Resumed. Call results() to see where the session stands, then continue the loop."
        return SessionInfo(
            tag=tag, branch=branch, base_commit=session["base_commit"], resumed=resumed, data_ready=ready,
            next_step=next_step, warnings=self.warnings(),
        )

    def session_record(self, tag: str, branch: str, base_commit: str) -> dict:
        return {
            "type": "session",
            "tag": tag,
            "branch": branch,
            "base_commit": base_commit,
            "profile": self.profile_name,
            "dataset": self.dataset,
            "budget_seconds": self.budget_seconds,
            "pins": harness.harness_pins(self.root, self.harness),
        }

    @state_change
    def edit_train(self, old_text: str, new_text: str) -> EditResult:
        before = ws.read_in_scope(self.root, TRAIN)
        after, line = ws.edit_unique(before, old_text, new_text)
        return self.write_train_text(before, after, line)

    @state_change
    def write_train(self, content: str) -> EditResult:
        before = ws.read_in_scope(self.root, TRAIN)
        ws.check_size("train.py", content, ws.MAX_TRAIN_BYTES)
        first = next((i for i, (a, b) in enumerate(zip(before.splitlines(), content.splitlines())) if a != b), None)
        line = (first if first is not None else min(len(before.splitlines()), len(content.splitlines()))) + 1
        return self.write_train_text(before, content, line)

    def write_train_text(self, before: str, after: str, line: int) -> EditResult:
        if self.runs.current() is not None:
            raise WorkspaceError(
                "A run is in progress; edit train.py after it ends (wait_for_run) or cancel it. (The run trains "
                "the copy of its commit, so nothing edited now would change it.)"
            )
        ws.write_in_scope(self.root, after, TRAIN)
        return EditResult(diff=ws.unified_diff(before, after, TRAIN), line=line, lines=len(after.splitlines()))

    # ---------------------------------------------------------------- tools: runs

    async def run_experiment(self, description: str, max_wait: float | None, on_progress=None,
                             seed: int = DEFAULT_SEED, kind: str = "experiment") -> RunResult:
        # in a worker thread: the workspace lock may be held for seconds by a cancel, and the event loop must not wait
        start = functools.partial(self.start_run, description, seed=seed, kind=kind)
        run_id = await anyio.to_thread.run_sync(start)
        return await self.wait_for_run(run_id, max_wait, on_progress)

    @state_change
    def start_run(self, description: str, *, seed: int = DEFAULT_SEED, kind: str = "experiment") -> str:
        """Everything that must hold before budget is spent, then commit and launch. Returns the run id."""
        description = ws.check_description(description)
        session = self.require_session()
        current = self.runs.current()
        if current is not None:
            raise WorkspaceError(
                f"Run {current.run_id} is still training. Call wait_for_run({current.run_id!r}) or "
                f"cancel_run({current.run_id!r}) first."
            )
        runs = self.session_runs(session)
        pending = self.undecided(runs)
        if pending is not None:
            raise WorkspaceError(
                f"Run {pending['id']} succeeded (val_bpb {pending.get('val_bpb')}) and still needs a decision: "
                f"call keep({pending['id']!r}) or discard({pending['id']!r}) before starting another run."
            )
        if not self.data_ready():
            raise WorkspaceError(f"The dataset is not prepared. Ask the human to run: {self.prepare_command()}")
        self.git.ensure_only_train_dirty()
        pins = self.session_pins(session)
        if changed := harness.harness_changes(self.root, pins):
            raise WorkspaceError(
                f"{', '.join(changed)} changed since the session started; the evaluation harness is frozen. "
                f"Restore it with {harness.restore_hint(changed, session['base_commit'])}."
            )
        source = ws.read_in_scope(self.root, TRAIN)
        preflight(source)
        self.runs.ensure_device_free()
        run_id = self.ledger.next_run_id()
        parent, _ = self.kept(session, runs)
        head = self.git.head()
        # the fsynced "starting" record comes first: a kill -9 at any later instant leaves a record to settle
        self.runs.announce(run_id, description, seed=seed, kind=kind, session=session["tag"], parent=parent,
                           head=head)
        commit = head
        try:
            if self.git.train_changed():
                commit = self.git.commit_train(description)
            committed = self.git.show_file(commit, TRAIN)
            if committed != source:  # train.py changed on disk between the check and the commit: check what runs
                preflight(committed)
            self.git.set_ref(run_id, commit)
            self.runs.start(run_id, commit, description, seed=seed, kind=kind, pins=pins, session=session["tag"],
                            parent=parent, announced=True)
        except BaseException as e:
            if self.runs.get(run_id) is None:  # it never started: the record says why, and names what git holds
                reason = str(e) if isinstance(e, WorkspaceError) else repr(e)
                self.ledger.append({"type": "run", "id": run_id, "status": "crashed", "commit": commit,
                                    "ended_at": now_iso(), "error": f"the run could not start: {reason}"})
            raise
        return run_id

    def session_pins(self, session: dict) -> dict:
        """Pins fixed at session start; a session started before data was prepared gets its fingerprint now."""
        pins = session["pins"]
        if pins.get("val_fingerprint") is None:
            self._harness = None  # the data appeared since: ask the harness again
            pins = harness.harness_pins(self.root, self.harness)
            self.ledger.append({**session, "pins": pins})
        return pins

    async def wait_for_run(self, run_id: str, max_wait: float | None, on_progress=None) -> RunResult:
        run = self.require_run(run_id)
        if run.get("status") in IN_FLIGHT:
            try:
                run = await self.runs.wait(run["id"], max_wait, on_progress)
            except BaseException:
                # the client gave up on this call (cancelled): a run nobody waits for must not hold the device
                if self.runs.current() is not None and self.runs.current().run_id == run["id"]:
                    self.runs.cancel(run["id"])
                raise
        return self.run_result(run, self.ledger.runs(run.get("session")))

    @state_change
    def cancel_run(self, run_id: str) -> RunResult:
        run = self.require_run(run_id)
        current = self.runs.current()
        if current is None or current.run_id != run["id"]:
            raise WorkspaceError(f"Run {run_id} is not running (status {run.get('status')}); nothing to cancel.")
        record = self.runs.cancel(run["id"])
        return self.run_result(record, self.ledger.runs(record.get("session")))

    def run_result(self, run: dict, runs: list[dict]) -> RunResult:
        ids = [r["id"] for r in runs]
        earlier = runs[:ids.index(run["id"])] if run["id"] in ids else runs  # ledger order, not id order
        best = self.best(earlier)
        best_bpb = best["val_bpb"] if best else None
        val_bpb = run.get("val_bpb")
        delta = val_bpb - best_bpb if val_bpb is not None and best_bpb is not None else None
        noise = self.noise_floor(run.get("profile"), run.get("dataset"))
        sigma = delta / noise.std if delta is not None and noise and noise.std > 0 else None
        within = abs(sigma) < NOISE_SIGMAS if sigma is not None else None
        status = run.get("status")
        progress = None
        if status in IN_FLIGHT and self.runs.get(run["id"]) is not None:
            progress = RunProgress(**self.runs.progress(run["id"]))
        return RunResult(
            run_id=run["id"],
            commit=run["commit"],
            description=run.get("description", ""),
            status=status,
            decision=run.get("decision"),
            val_bpb=val_bpb,
            metrics=run.get("metrics") or {},
            best_val_bpb=best_bpb,
            delta_vs_best=delta,
            delta_in_sigma=sigma,
            within_noise=within,
            progress=progress,
            error=run.get("error"),
            log_tail=run.get("log_tail") if status not in ("succeeded", "running") else None,
            next_step=next_step_for(run, delta, within),
        )

    # ---------------------------------------------------------------- tools: decisions

    def session_run(self, run_id: str) -> tuple[dict, dict]:
        """The active session and one of its runs; a run of another session cannot be decided here."""
        session = self.require_session()
        run = self.require_run(run_id)
        if run.get("session") != session["tag"]:
            raise WorkspaceError(f"Run {run_id} belongs to session {run.get('session')!r}, not {session['tag']!r}.")
        return session, run

    @state_change
    def keep(self, run_id: str) -> Decision:
        session, run = self.session_run(run_id)
        if run.get("status") != "succeeded":
            raise WorkspaceError(
                f"Run {run_id} {run.get('status')}; only a succeeded run can be kept. Fix train.py and run again, "
                f"or discard({run_id!r})."
            )
        if run.get("decision") is not None:
            raise WorkspaceError(f"Run {run_id} was already decided ({run['decision']}).")
        head = self.git.head()
        if head != run["commit"]:
            raise WorkspaceError(
                f"HEAD is {self.git.short(head)}, not run {run_id}'s commit {self.git.short(run['commit'])}; "
                "only the latest run can be kept."
            )
        self.ledger.append({"type": "run", "id": run["id"], "decision": "keep"})
        return self.decision(session, run["id"], "keep")

    @state_change
    def discard(self, run_id: str) -> Decision:
        session, run = self.session_run(run_id)
        current = self.runs.current()
        if run.get("status") in IN_FLIGHT or (current is not None and current.run_id == run["id"]):
            raise WorkspaceError(f"Run {run_id} is still training; cancel_run({run_id!r}) first.")
        if run.get("decision") is not None:
            raise WorkspaceError(f"Run {run_id} was already decided ({run['decision']}).")
        self.git.ensure_only_train_dirty()
        kept, _ = self.kept(session, self.session_runs(session))
        if self.git.head() != kept or self.git.train_changed():
            self.git.reset_train_to(kept)
        self.ledger.append({"type": "run", "id": run["id"], "decision": "discard"})
        return self.decision(session, run["id"], "discard")

    def decision(self, session: dict, run_id: str, decision: str) -> Decision:
        runs = self.session_runs(session)
        kept, _ = self.kept(session, runs)
        best = self.best(runs)
        return Decision(
            run_id=run_id,
            decision=decision,
            head=self.git.head(),
            kept_commit=kept,
            best_val_bpb=best["val_bpb"] if best else None,
            next_step="Edit train.py with your next idea, then run_experiment(description).",
        )

    # ---------------------------------------------------------------- noise floor

    async def measure_noise(self, repeats: int, on_progress=None) -> NoiseFloor:
        """Re-run the kept commit with different seeds; the spread is what a change must beat."""
        session = self.require_session()
        kept, _ = self.kept(session, self.session_runs(session))
        if self.git.head() != kept or self.git.train_changed():
            raise WorkspaceError(
                "measure_noise re-runs the last kept commit: discard or keep the latest run and undo "
                "uncommitted train.py edits first (diff_train shows them)."
            )
        values, run_ids = [], []
        for seed in range(DEFAULT_SEED + 1, DEFAULT_SEED + 1 + repeats):
            result = await self.run_experiment(f"noise floor: seed {seed}", None, on_progress, seed=seed, kind="noise")
            run_ids.append(result.run_id)
            if result.status != "succeeded":
                raise WorkspaceError(f"Noise run {result.run_id} {result.status}: {result.error}. Fix that first.")
            with self.lock.held():
                self.ledger.append({"type": "run", "id": result.run_id, "decision": "discard"})
            values.append(result.val_bpb)
        kept_runs = [r for r in self.session_runs(session) if r.get("decision") == "keep" and r["commit"] == kept]
        values += [r["val_bpb"] for r in kept_runs if r.get("val_bpb") is not None]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        with self.lock.held():
            self.ledger.append({
                "type": "noise", "profile": self.profile_name, "dataset": self.dataset, "commit": kept,
                "run_ids": run_ids, "values": values, "mean": statistics.fmean(values), "std": std,
            })
        return self.noise_floor(self.profile_name, self.dataset)

    # ---------------------------------------------------------------- rows

    def result_row(self, run: dict) -> ResultRow:
        metrics = run.get("metrics") or {}
        memory = metrics.get("peak_vram_mb")
        return ResultRow(
            run_id=run["id"],
            commit=run["commit"][:7],
            val_bpb=run.get("val_bpb"),
            memory_gb=round(memory / 1024, 1) if isinstance(memory, (int, float)) else None,
            status=row_status(run),
            description=run.get("description", ""),
        )


def next_step_for(run: dict, delta: float | None, within_noise: bool | None) -> str:
    status, run_id = run.get("status"), run["id"]
    if status in IN_FLIGHT:
        return f"Still training. Call wait_for_run({run_id!r}) to keep waiting, or cancel_run({run_id!r})."
    if run.get("decision"):
        return "Decided. Edit train.py with the next idea and run_experiment."
    if status == "succeeded":
        if delta is None:
            return f"Baseline measured. keep({run_id!r}) to make it the reference."
        if within_noise:
            return (
                f"The change ({delta:+.6f}) is within the noise floor: re-run it before trusting it, "
                f"or discard({run_id!r})."
            )
        if delta < 0:
            return f"Improved by {-delta:.6f} bpb: keep({run_id!r})."
        return f"Not better ({delta:+.6f} bpb): discard({run_id!r})."
    return (
        f"The run {status}. Read the error and log_tail (or read_log({run_id!r})); fix train.py and run again, "
        f"or discard({run_id!r}) to go back to the last kept version."
    )
