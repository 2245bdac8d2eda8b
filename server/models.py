"""Pydantic models of what the tools return: every field described, so clients can show and reason about them."""

from pydantic import BaseModel, Field

RunStatus = str  # queued | starting | running | succeeded | crashed | timed_out | cancelled | interrupted
STATUSES = ("queued: waiting for a free device; starting | running | succeeded | crashed | timed_out | cancelled | "
            "interrupted (the server died mid-run)")


class NoiseFloor(BaseModel):
    """Seed-to-seed spread of val_bpb for the current best commit, measured by measure_noise."""

    std: float = Field(description="Standard deviation of val_bpb across seeds (sigma)")
    mean: float = Field(description="Mean val_bpb across the noise runs")
    repeats: int = Field(description="How many runs the spread was measured from")
    commit: str = Field(description="Commit the noise runs trained")


class RunProgress(BaseModel):
    """Latest progress parsed from a running job's log."""

    phase: str = Field(
        "starting", description="starting | compiling | warm-up | training | exporting | evaluating | done")
    step: int | None = Field(None, description="Optimizer steps done")
    percent: float | None = Field(None, description="Share of the training budget used, 0-100")
    loss: float | None = Field(None, description="Latest training loss")
    seconds_left: float | None = Field(None, description="Training seconds left in the budget")
    eval_percent: float | None = Field(None, description="Share of the validation rows scored, 0-100, while evaluating")
    elapsed: float | None = Field(None, description="Wall-clock seconds since the run started")


class RunResult(BaseModel):
    """One training run: what ran, how it ended, and how it compares with the best kept result."""

    run_id: str = Field(description="Run id, e.g. r0007; use it with wait_for_run, keep, discard, read_log")
    commit: str = Field(description="The candidate commit of train.py that was trained (kept reachable as "
                        "refs/autoresearch/runs/<id>); the branch reaches it only on keep")
    parent: str | None = Field(None, description="The kept commit the candidate was made on; keep fast-forwards "
                               "only while it is still the kept commit")
    device: str | None = Field(None, description="Device the run trains or trained on")
    node: str | None = Field(None, description="Host the run trains or trained on (a Ray node, or this machine)")
    description: str = Field(description="What this experiment tried")
    status: RunStatus = Field(description=STATUSES)
    decision: str | None = Field(None, description="keep | discard once decided, else null")
    val_bpb: float | None = Field(None, description="Validation bits per byte from the frozen evaluation (lower is better)")
    metrics: dict[str, float | int | str] = Field(
        default_factory=dict,
        description=("The run's summary block as train.py printed it (num_steps, depth, ...), with the official "
                     "figures from trusted code only: training_seconds and training_tokens (the feeder's clock), "
                     "peak_vram_mb, mfu_percent, rows/tokens_evaluated, eval_seconds, isolation"),
    )
    best_val_bpb: float | None = Field(None, description="Best kept val_bpb of this session before this run")
    delta_vs_best: float | None = Field(None, description="val_bpb minus best_val_bpb; negative means better")
    delta_in_sigma: float | None = Field(None, description="delta_vs_best in units of the noise floor's sigma")
    within_noise: bool | None = Field(
        None, description="True when |delta_vs_best| < 2 sigma of the measured noise floor (re-run before keeping)"
    )
    progress: RunProgress | None = Field(None, description="Latest progress while the run is still running")
    error: str | None = Field(None, description="Why the run failed, when it did")
    log_tail: str | None = Field(None, description="Last lines of the log, when the run failed")
    next_step: str = Field(description="What the agent should do now")


class Status(BaseModel):
    """Where the research stands right now."""

    workspace: str = Field(description="Workspace directory")
    branch: str | None = Field(description="Checked-out git branch")
    head: str = Field(description="HEAD commit")
    session: str | None = Field(description="Session tag, when a session is active on this branch")
    kept_commit: str | None = Field(description="Last kept commit: the baseline every new run is compared with")
    kept_val_bpb: float | None = Field(description="val_bpb of the last kept run")
    best_val_bpb: float | None = Field(description="Best val_bpb kept in this session")
    run_in_progress: RunResult | None = Field(description="The first run in flight, with its progress (see runs_in_flight)")
    runs_in_flight: list[RunResult] = Field(
        default_factory=list, description="Every run queued or training now, each with its device and progress")
    awaiting_decision: str | None = Field(description="The oldest run that succeeded and still needs keep or discard")
    undecided: list[str] = Field(
        default_factory=list, description="Every succeeded run still awaiting keep or discard; none blocks new runs")
    profile: dict = Field(description="Profile constants in force (name, max_seq_len, time_budget, eval_tokens, vocab_size)")
    dataset: str = Field(description="Dataset the runs train and evaluate on")
    budget_seconds: float = Field(description="Training budget of each run, in seconds")
    data_ready: bool = Field(description="Whether the dataset and tokenizer are prepared")
    prepare_command: str = Field(description="The command that prepares the data, when it is not ready")
    device: str = Field(description="cuda | mps | cpu, as the harness sees it")
    train_py_modified: bool = Field(description="Whether the working-tree train.py (the scratch copy) differs from "
                                    "the kept version")
    noise_floor: NoiseFloor | None = Field(description="Measured seed noise for this profile and dataset, if any")
    runs: int = Field(description="Runs recorded in this session")
    ledger_damaged_lines: list[int] = Field(
        description="Ledger lines that were torn or garbled (e.g. by a power loss) and skipped; empty when healthy"
    )
    warnings: list[str] = Field(
        default_factory=list, description="Set-up problems that make val_bpb less trustworthy (e.g. too few tokens)")
    isolation: str | None = Field(
        None, description="The trainer's isolation for runs started now: sandbox | none (serve --isolation)")
    isolation_reason: str | None = Field(None, description="What that isolation means here, and why it is in force")


class SessionInfo(BaseModel):
    """A research session: a branch autoresearch/<tag> and its ledger entries."""

    tag: str = Field(description="Session tag")
    branch: str = Field(description="The session's git branch")
    base_commit: str = Field(description="Commit the session started from")
    resumed: bool = Field(description="Whether an existing session was resumed")
    data_ready: bool = Field(description="Whether data and tokenizer are prepared")
    next_step: str = Field(description="What to do next")
    warnings: list[str] = Field(
        default_factory=list, description="Set-up problems that make val_bpb less trustworthy (e.g. too few tokens)")


class FileText(BaseModel):
    """Line-numbered text of an in-scope file."""

    path: str = Field(description="Workspace-relative path")
    text: str = Field(description="Line-numbered content (number, tab, line)")
    total_lines: int = Field(description="Lines in the whole file")


class EditResult(BaseModel):
    """What an edit of train.py changed."""

    diff: str = Field(description="Unified diff of the change")
    line: int = Field(description="First changed line")
    lines: int = Field(description="Lines in train.py after the edit")


class DiffResult(BaseModel):
    """train.py against the last kept commit."""

    base: str = Field(description="Commit compared against (the last kept one)")
    diff: str = Field(description="Unified diff; empty when train.py equals the kept version")


class Decision(BaseModel):
    """The outcome of keep or discard."""

    run_id: str = Field(description="The decided run")
    decision: str = Field(description="keep | discard")
    head: str = Field(description="Branch HEAD after the decision")
    kept_commit: str = Field(description="Baseline for the next run")
    best_val_bpb: float | None = Field(description="Best kept val_bpb of the session after the decision")
    train_py_restored: bool = Field(
        False, description="discard: whether the working-tree train.py was put back to the kept version (only when "
        "it still held the discarded code)")
    next_step: str = Field(description="What to do next")


class ResultRow(BaseModel):
    """One row of the ledger, as results.tsv shows it (plus the run id)."""

    run_id: str = Field(description="Run id")
    commit: str = Field(description="Short commit")
    val_bpb: float | None = Field(description="val_bpb, null when the run produced none")
    memory_gb: float | None = Field(description="Peak memory in GB")
    status: str = Field(description="keep | discard | crash | queued | running | pending (succeeded, undecided)")
    device: str | None = Field(None, description="Device that ran it")
    node: str | None = Field(None, description="Host that ran it (a Ray node, or this machine)")
    description: str = Field(description="What the run tried")


class Results(BaseModel):
    """The session's ledger as rows, with the best run and the noise floor."""

    rows: list[ResultRow] = Field(description="Most recent runs last")
    in_flight: list[RunResult] = Field(
        default_factory=list, description="Every run queued or training now, with its device and progress")
    undecided: list[str] = Field(default_factory=list, description="Succeeded runs still awaiting keep or discard")
    total: int = Field(description="Runs in the session")
    best: ResultRow | None = Field(description="The kept run with the lowest val_bpb")
    noise_floor: NoiseFloor | None = Field(description="Measured seed noise, if any")


class LogText(BaseModel):
    """The end of a run's log."""

    run_id: str = Field(description="Run id")
    text: str = Field(description="The last lines of the log")
    lines: int = Field(description="Lines returned")
    total_lines: int = Field(description="Lines in the whole log")


class Conflict(BaseModel):
    """One place where the kept version and the rebased run changed the same lines."""

    line: int = Field(description="Line of train.py where the <<<<<<< marker of this conflict starts")
    kept: str = Field(description="The kept version's lines (between <<<<<<< and =======)")
    run: str = Field(description="The run's lines (between ======= and >>>>>>>)")


class RebaseResult(BaseModel):
    """A run's change re-applied onto the kept commit, in the working-tree train.py."""

    run_id: str = Field(description="The rebased run")
    onto: str = Field(description="The kept commit the change was re-applied onto")
    base: str = Field(description="The commit the run's change was made on")
    clean: bool = Field(description="True when the change applied without conflicts")
    conflicts: list[Conflict] = Field(
        default_factory=list, description="Conflict hunks, also written into train.py between markers")
    diff: str = Field(description="train.py against the kept commit after the rebase")
    next_step: str = Field(description="What to do next")
