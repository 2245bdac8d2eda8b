"""The research loop as plain methods: session, edits, runs, keep/discard/rebase, results.

The MCP layer (app.py) and the CLI both sit on this class; nothing here knows about MCP. Every refusal is a
WorkspaceError whose message says what was wrong and what to do.

Candidates, not a moving branch: a run trains a candidate commit whose parent is the kept commit (the branch tip),
and the branch advances only on keep, by fast-forward. The working-tree train.py is the agent's scratch copy:
runs never change it; discard puts the kept version back only when the scratch still holds the discarded code
(a single-run agent then finds the kept version, as before); rebase_run writes a candidate re-applied onto the kept
commit into it. Several candidates can be in flight or undecided at once; none blocks another.
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
    Conflict,
    Decision,
    DiffResult,
    EditResult,
    FileText,
    LogText,
    NoiseFloor,
    RebaseResult,
    ResultRow,
    Results,
    RunProgress,
    RunResult,
    SessionInfo,
    Status,
)
from server.preflight import preflight
from server.pool import make_executor
from server.runs import RunManager
from server.wslock import ServerClaim, WorkspaceLock

DEFAULT_SEED = 42
NOISE_SIGMAS = 2.0  # a change smaller than this many sigmas of seed noise is not evidence of anything
FINISHED = {"succeeded", "crashed", "timed_out", "cancelled", "interrupted"}
IN_FLIGHT = {"queued", "starting", "running"}  # queued: waiting for a device of the pool
NOISE_POLL_SECONDS = 0.5  # measure_noise, waiting for room in the pool for its next repeat


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
    isolation: str = "auto"  # the trainer's sandbox: auto | sandbox | none (serve --isolation, server/sandbox.py)
    devices: str | None = None  # serve --devices (server/pool.py); None: the harness's one device, no queue
    executor: str = "local"  # serve --executor local | ray (server/ray_executor.py)
    ray_address: str | None = None  # serve --ray-address ADDR | auto | local


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

    @property
    def dataset_source(self) -> str:
        """What the user named: a builtin dataset, or the folder a local dataset was prepared from."""
        return self.harness.get("source") or self.dataset

    def prepare_command(self) -> str:
        return f"autoresearch-mcp prepare --dataset {self.dataset_source} --profile {self.profile_name}"

    @property
    def runs(self) -> RunManager:
        if self._runs is None:
            self._runs = RunManager(
                self.root,
                self.ledger,
                self.git,
                profile=self.profile_name,
                dataset=self.dataset,
                dataset_source=self.dataset_source,
                cache=self.cache,
                budget_seconds=self.budget_seconds,
                python=self.settings.python,
                device=self.harness["device"],
                timeout_seconds=self.settings.timeout_seconds,
                isolation=self.settings.isolation,
                **make_executor(self.settings),
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

    def undecided(self, runs: list[dict]) -> list[dict]:
        """Succeeded runs nobody has kept or discarded yet. They block nothing: they are listed so the agent
        decides them as results arrive."""
        return [r for r in runs if r.get("status") == "succeeded" and r.get("decision") is None]

    def in_flight(self, runs: list[dict]) -> list[dict]:
        """Runs queued or training now, this server's (a run left by a dead server is settled at start-up)."""
        return [r for r in runs if r.get("status") in IN_FLIGHT and self.runs.get(r["id"]) is not None]

    def has_room(self) -> bool:
        """Whether another run can start now: with a device pool (serve --devices) always, a run that finds no
        free slot waits `queued`; with the harness's one device, when nothing is in flight."""
        return self.runs.has_room()

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
        flying = [self.run_result(r, runs) for r in self.in_flight(runs)]
        undecided = [r["id"] for r in self.undecided(runs)]
        return Status(
            workspace=str(self.root),
            branch=self.git.branch(),
            head=self.git.head(),
            session=session["tag"] if session else None,
            kept_commit=kept_commit,
            kept_val_bpb=kept_bpb,
            best_val_bpb=best["val_bpb"] if best else None,
            run_in_progress=flying[0] if flying else None,
            runs_in_flight=flying,
            awaiting_decision=undecided[0] if undecided else None,
            undecided=undecided,
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
            in_flight=[self.run_result(r, runs) for r in self.in_flight(runs)],
            undecided=[r["id"] for r in self.undecided(runs)],
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
        # allowed while runs train: each trains the copy of its own commit, so the scratch copy is free to change
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
    def start_run(self, description: str, *, seed: int = DEFAULT_SEED, kind: str = "experiment",
                  commit: str | None = None) -> str:
        """Everything that must hold before budget is spent, then make the candidate and launch it. The candidate
        is the working-tree train.py committed on top of the kept commit (the branch tip), or, given `commit`
        (noise runs), that commit itself. Returns the run id."""
        description = ws.check_description(description)
        session = self.require_session()
        if not self.has_room():
            current = self.runs.current()
            raise WorkspaceError(
                f"Run {current.run_id} is still training and the device pool has no free slot. Call "
                f"wait_for_run({current.run_id!r}) or cancel_run({current.run_id!r}) first."
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
        head = self.git.head()
        if commit is None:
            source = ws.read_in_scope(self.root, TRAIN)
            preflight(source)
            parent = head
            # no ref points at it yet, so a kill -9 before the announcement leaves nothing anyone can see
            commit = self.git.commit_candidate(source, parent, description)
        else:
            commit = parent = self.git.commit_sha(commit)
            preflight(self.git.show_file(commit, TRAIN))
        self.runs.ensure_device_free()
        run_id = self.ledger.next_run_id()
        # the fsynced "starting" record names the candidate before its run ref or any process exists
        self.runs.announce(run_id, description, seed=seed, kind=kind, session=session["tag"], parent=parent,
                           head=head, commit=commit)
        try:
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
                handle = self.runs.get(run["id"])
                if handle is not None and not handle.done.is_set():
                    self.runs.cancel(run["id"])
                raise
        return self.run_result(run, self.ledger.runs(run.get("session")))

    @state_change
    def cancel_run(self, run_id: str) -> RunResult:
        run = self.require_run(run_id)
        handle = self.runs.get(run["id"])
        if handle is None or handle.done.is_set():
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
        stale = (status == "succeeded" and run.get("decision") is None and run.get("parent") is not None
                 and run["parent"] != run["commit"] and not self.builds_on_tip(run))
        return RunResult(
            run_id=run["id"],
            commit=run["commit"],
            parent=run.get("parent"),
            device=run.get("device"),
            node=run.get("node"),
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
            next_step=next_step_for(run, delta, within, stale),
        )

    def builds_on_tip(self, run: dict) -> bool:
        """Whether keep(run) can take effect now: its parent is the kept commit (the branch tip), or the branch is
        at its commit already (a re-run of the kept code, or a run made before candidates, which moved the branch)."""
        tip = self.git.head()
        return tip in (run.get("commit"), run.get("parent"))

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
        """Fast-forward the branch to the run's candidate, which becomes the baseline; refused when another keep
        moved the branch since the run was made (its val_bpb was measured against an older baseline)."""
        session, run = self.session_run(run_id)
        if run.get("status") != "succeeded":
            raise WorkspaceError(
                f"Run {run_id} {run.get('status')}; only a succeeded run can be kept. Fix train.py and run again, "
                f"or discard({run_id!r})."
            )
        if run.get("decision") is not None:
            raise WorkspaceError(f"Run {run_id} was already decided ({run['decision']}).")
        tip = self.git.head()
        if not self.builds_on_tip(run):
            runs = self.session_runs(session)
            since = [r["id"] for r in runs if r.get("decision") == "keep" and r.get("commit") == tip]
            moved = f" (run {since[-1]} was kept since)" if since else ""
            built_on = self.git.short(run["parent"]) if run.get("parent") else "an older commit"
            raise WorkspaceError(
                f"The baseline moved since run {run_id} was made: it builds on {built_on}, and "
                f"the kept commit is now {self.git.short(tip)}{moved}. Its change was never measured on top of the "
                f"kept version: call rebase_run({run_id!r}) to re-apply it there, run_experiment it again and keep "
                f"that run if it still wins (then discard({run_id!r}))."
            )
        if tip != run["commit"]:
            self.git.advance_branch(run["commit"], tip)
        self.ledger.append({"type": "run", "id": run["id"], "decision": "keep"})
        return self.decision(session, run["id"], "keep")

    @state_change
    def discard(self, run_id: str) -> Decision:
        """Record the decision; the branch never moved for this run. The working-tree train.py goes back to the kept
        version only if it still holds exactly the discarded code: edits made since are the agent's, and stay."""
        session, run = self.session_run(run_id)
        handle = self.runs.get(run["id"])
        if run.get("status") in IN_FLIGHT or (handle is not None and not handle.done.is_set()):
            raise WorkspaceError(f"Run {run_id} is still training; cancel_run({run_id!r}) first.")
        if run.get("decision") is not None:
            raise WorkspaceError(f"Run {run_id} was already decided ({run['decision']}).")
        kept, _ = self.kept(session, self.session_runs(session))
        commit = run.get("commit")
        restored = False
        if commit is not None and commit != kept and self.git.head() == commit:
            # a run made before candidates moved the branch itself: move it back, as discard did then
            self.git.ensure_only_train_dirty()
            self.git.reset_train_to(kept)
            restored = True
        elif commit is not None and commit != kept:
            scratch = ws.read_in_scope(self.root, TRAIN)
            if scratch == self.git.show_file(commit, TRAIN) and scratch != self.git.show_file(kept, TRAIN):
                self.git.restore_train(kept)
                restored = True
        self.ledger.append({"type": "run", "id": run["id"], "decision": "discard"})
        return self.decision(session, run["id"], "discard", restored=restored)

    @state_change
    def rebase_run(self, run_id: str) -> RebaseResult:
        """Re-apply a run's train.py change (its parent -> its commit) onto the kept commit, three-way, into the
        working tree, so it can run again. The scratch copy is overwritten only when git holds its text already
        (the session's start, a kept version, some run's code); both sides of a conflict are written into train.py with markers
        and come back as hunks."""
        session, run = self.session_run(run_id)
        commit = run.get("commit")
        if commit is None:
            raise WorkspaceError(f"Run {run_id} has no commit (it stopped before one was made); nothing to rebase.")
        base = run.get("parent") or commit
        tip = self.git.head()
        runs = self.session_runs(session)
        scratch = ws.read_in_scope(self.root, TRAIN)
        known = self.git.train_blob_ids([tip, session["base_commit"]] + [r.get(k) for r in runs
                                                                       for k in ("commit", "parent")])
        if self.git.blob_id(scratch) not in known:
            raise WorkspaceError(
                f"train.py holds edits that no run has recorded yet (diff_train shows them), and rebase_run would "
                f"overwrite them. Run them first (run_experiment) or undo them (edit_train), then call "
                f"rebase_run({run_id!r}) again."
            )
        labels = (f"kept {self.git.short(tip)}", f"base {self.git.short(base)}", f"run {run['id']}")
        merged, count = self.git.merge_train(base, tip, commit, labels)
        ws.write_in_scope(self.root, merged, TRAIN)
        conflicts = conflict_hunks(merged, labels[0], labels[2])
        diff = self.git.diff_train(tip)
        if conflicts:
            next_step = (f"{len(conflicts)} conflict(s): both the kept version and run {run_id} changed the same "
                         f"lines. Resolve each <<<<<<< ... >>>>>>> block in train.py with edit_train (keep what "
                         f"both intended), then run_experiment.")
        elif not diff:
            next_step = f"Run {run_id}'s change is already in the kept version: nothing to run again."
        else:
            next_step = (f"Run {run_id}'s change now sits on the kept version in train.py: "
                         f"run_experiment(description) to measure it there.")
        return RebaseResult(run_id=run["id"], onto=tip, base=base, clean=not conflicts and count == 0,
                            conflicts=conflicts, diff=diff, next_step=next_step)

    def decision(self, session: dict, run_id: str, decision: str, restored: bool = False) -> Decision:
        runs = self.session_runs(session)
        kept, _ = self.kept(session, runs)
        best = self.best(runs)
        if decision == "discard" and not restored and self.git.train_changed():
            next_step = ("train.py still holds your newer edits (diff_train shows them against the kept version): "
                         "go on from there, or undo them with edit_train.")
        else:
            next_step = "Edit train.py with your next idea, then run_experiment(description)."
        return Decision(
            run_id=run_id,
            decision=decision,
            head=self.git.head(),
            kept_commit=kept,
            best_val_bpb=best["val_bpb"] if best else None,
            train_py_restored=restored,
            next_step=next_step,
        )

    # ---------------------------------------------------------------- noise floor

    async def measure_noise(self, repeats: int, on_progress=None) -> NoiseFloor:
        """Re-run the kept commit with different seeds; the spread is what a change must beat. The repeats start
        as the pool has room (all at once on a pool with that many free slots), then are waited for. The
        working-tree train.py plays no part: the runs train the kept commit itself."""
        session = self.require_session()
        kept, _ = self.kept(session, self.session_runs(session))
        seeds = list(range(DEFAULT_SEED + 1, DEFAULT_SEED + 1 + repeats))
        run_ids: list[str] = []
        try:
            for seed in seeds:
                await self.wait_for_room(run_ids, on_progress)
                start = functools.partial(self.start_run, f"noise floor: seed {seed}", seed=seed, kind="noise",
                                          commit=kept)
                run_ids.append(await anyio.to_thread.run_sync(start))
            results = [await self.wait_for_run(run_id, None, on_progress) for run_id in run_ids]
        except BaseException:
            for run_id in run_ids:  # nobody will read them: they must not hold devices
                handle = self.runs.get(run_id)
                if handle is not None and not handle.done.is_set():
                    await anyio.to_thread.run_sync(self.runs.cancel, run_id)
            raise
        with self.lock.held():  # noise runs measured the kept code: they need no decision
            for result in results:
                if result.status == "succeeded":
                    self.ledger.append({"type": "run", "id": result.run_id, "decision": "discard"})
        if failed := next((r for r in results if r.status != "succeeded"), None):
            raise WorkspaceError(f"Noise run {failed.run_id} {failed.status}: {failed.error}. Fix that first.")
        values = [r.val_bpb for r in results]
        kept_runs = [r for r in self.session_runs(session) if r.get("decision") == "keep" and r["commit"] == kept]
        values += [r["val_bpb"] for r in kept_runs if r.get("val_bpb") is not None]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        with self.lock.held():
            self.ledger.append({
                "type": "noise", "profile": self.profile_name, "dataset": self.dataset, "commit": kept,
                "run_ids": run_ids, "values": values, "mean": statistics.fmean(values), "std": std,
            })
        return self.noise_floor(self.profile_name, self.dataset)

    async def wait_for_room(self, mine: list[str], on_progress=None) -> None:
        """Until the pool can take another run: following one of `mine` in flight (its progress is reported), else
        polling (the slot is another run's)."""
        while not self.has_room():
            flying = [run_id for run_id in mine if not self.runs.require(run_id).done.is_set()]
            if flying:
                await self.runs.wait(flying[0], None, on_progress)
            else:
                await anyio.sleep(NOISE_POLL_SECONDS)

    # ---------------------------------------------------------------- rows

    def result_row(self, run: dict) -> ResultRow:
        metrics = run.get("metrics") or {}
        memory = metrics.get("peak_vram_mb")
        return ResultRow(
            run_id=run["id"],
            commit=(run.get("commit") or "")[:7],
            val_bpb=run.get("val_bpb"),
            memory_gb=round(memory / 1024, 1) if isinstance(memory, (int, float)) else None,
            status=row_status(run),
            device=run.get("device"),
            node=run.get("node"),
            description=run.get("description", ""),
        )


def next_step_for(run: dict, delta: float | None, within_noise: bool | None, stale: bool = False) -> str:
    status, run_id = run.get("status"), run["id"]
    if status == "queued":
        return f"Waiting for a free device. Call wait_for_run({run_id!r}), or cancel_run({run_id!r})."
    if status in IN_FLIGHT:
        return f"Still training. Call wait_for_run({run_id!r}) to keep waiting, or cancel_run({run_id!r})."
    if run.get("decision"):
        return "Decided. Edit train.py with the next idea and run_experiment."
    if status == "succeeded" and stale:
        if delta is not None and delta < 0 and not within_noise:
            return (f"Better than the best ({delta:+.6f} bpb), but another run was kept since this one was made: "
                    f"rebase_run({run_id!r}), run it again on the new baseline, and keep that run if it still wins.")
        return (f"Another run was kept since this one was made ({delta:+.6f} bpb against the best then): "
                f"discard({run_id!r}), or rebase_run({run_id!r}) and run it again if it was a near-miss."
                if delta is not None else f"Another run was kept since: rebase_run({run_id!r}) or discard it.")
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


def conflict_hunks(text: str, ours: str, theirs: str) -> list[Conflict]:
    """The conflict blocks git merge-file wrote (labelled ours / theirs), each with its first line in the file."""
    lines, conflicts, i = text.splitlines(), [], 0
    while i < len(lines):
        if lines[i] != f"<<<<<<< {ours}":
            i += 1
            continue
        middle = next((j for j in range(i + 1, len(lines)) if lines[j] == "======="), None)
        end = next((k for k in range(middle + 1, len(lines)) if lines[k] == f">>>>>>> {theirs}"), None) \
            if middle is not None else None
        if end is None:
            break
        conflicts.append(Conflict(line=i + 1, kept="\n".join(lines[i + 1:middle]),
                                  run="\n".join(lines[middle + 1:end])))
        i = end + 1
    return conflicts
