"""The MCP server: one small function per tool, each a thin wrapper over Research."""

import functools
import inspect
import logging
from contextlib import asynccontextmanager
from typing import Annotated

from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from server.errors import WorkspaceError
from server.gitops import TRAIN
from server.models import (
    Decision,
    DiffResult,
    EditResult,
    FileText,
    LogText,
    NoiseFloor,
    RebaseResult,
    Results,
    RunResult,
    SessionInfo,
    Status,
)
from server.layout import RESULTS_NAME, TSV_HEADER
from server.plot import progress_png
from server.research import Research, Settings
from server.workspace import read_in_scope

log = logging.getLogger("autoresearch")

INSTRUCTIONS = """\
Autonomous LLM-pretraining research. You improve training/train.py so that val_bpb (validation bits per byte,
lower is better) drops within a fixed wall-clock training budget. The evaluation (training/prepare.py) is frozen.
The loop:
1. start_session(tag) once (resume=true to continue). status() tells you where things stand.
2. Baseline: run_experiment("baseline") with train.py unchanged, then keep(run_id).
3. Forever: read_file / edit_train (or write_train) one idea -> run_experiment(description) -> if val_bpb
   improved on the best kept value, keep(run_id); otherwise discard(run_id). A crashed run needs no decision:
   fix train.py and run again, or discard. If a result is within_noise, re-run it before keeping.
Each run trains a candidate commit of train.py made on the kept commit; the branch moves only on keep. The
working-tree train.py is your scratch copy. Several devices: submit several ideas with max_wait_seconds=0 (undo
each edit before the next), decide each as its result arrives; when keep says the baseline moved, rebase_run(run_id)
re-applies that change onto the kept version so you can run it again. Undecided runs never block new ones.
Runs take the full budget: pass max_wait_seconds if your client cuts long tool calls, then wait_for_run(run_id).
Prefer simpler code at equal val_bpb. Never stop to ask the human; keep experimenting.
"""

READ_ONLY = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
EDITS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=False, openWorldHint=False)
RUNS = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
RESETS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=False, openWorldHint=False)

RunId = Annotated[str, Field(description="Run id as returned by run_experiment, e.g. r0007", max_length=64)]
MaxWait = Annotated[
    float | None,
    Field(
        None, ge=0, le=86_400,
        description="Return after this many seconds even if the run is still training (status 'running'); "
        "then call wait_for_run. Null waits until the run ends.",
    ),
]


def agent_errors(fn):
    """WorkspaceError is meant for the agent: pass its message through as a ToolError."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except WorkspaceError as e:
                raise ToolError(str(e)) from e
    else:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except WorkspaceError as e:
                raise ToolError(str(e)) from e
    return wrapper


def progress_reporter(ctx: Context):
    async def report(p: dict) -> None:
        # the message leads with the phase (and its own percent when evaluating), so a client shows more than a
        # frozen bar through compilation and evaluation; progress itself stays the training share, which only grows
        phase = p.get("phase") or ("starting" if p.get("step") is None else "training")
        eval_percent = p.get("eval_percent")
        parts = [f"{phase} {eval_percent:.0f}%" if phase == "evaluating" and eval_percent is not None else phase]
        if p.get("step") is not None:
            parts.append(f"step {p['step']}")
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if p.get("seconds_left") is not None:
            parts.append(f"{p['seconds_left']:.0f}s left")
        await ctx.report_progress(p.get("percent") or 0.0, 100.0, " | ".join(parts))
    return report


def create_server(settings: Settings) -> MCPServer:
    research = Research(settings)

    @asynccontextmanager
    async def lifespan(_server):
        research.claim()  # one server per workspace: a second one refuses to start
        try:
            interrupted = research.recover()
            if interrupted:
                log.warning("recorded runs left by a previous server as interrupted: %s", ", ".join(interrupted))
            try:
                yield {}
            finally:
                research.shutdown()  # a run nobody can wait for any more must not keep the device
        finally:
            research.release()

    mcp = MCPServer("autoresearch", instructions=INSTRUCTIONS, version="0.1.0", lifespan=lifespan)

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    def status() -> Status:
        """Where the research stands: branch, HEAD, last kept commit and its val_bpb, every run in flight with its
        device and progress, the runs awaiting a decision, profile/dataset/budget, whether data is prepared,
        device, whether train.py differs from the kept version, the trainer's isolation."""
        isolation, reason = research.runs.isolation_status()
        return research.status().model_copy(update={"isolation": isolation, "isolation_reason": reason})

    @mcp.tool(annotations=RUNS)
    @agent_errors
    def start_session(
        tag: Annotated[str, Field(description="Session tag; the branch is autoresearch/<tag>, e.g. nov29", max_length=64)],
        resume: Annotated[bool, Field(description="Continue an existing session with this tag")] = False,
    ) -> SessionInfo:
        """Create and check out branch autoresearch/<tag> from the current commit and open its ledger.
        Refuses an existing tag unless resume=true."""
        return research.start_session(tag, resume)

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    def read_file(
        path: Annotated[str, Field(description="training/train.py, training/prepare.py, training/runtime.py, program.md or README.md", max_length=256)] = TRAIN,
        offset: Annotated[int, Field(ge=1, description="First line to show (1-based)")] = 1,
        limit: Annotated[int, Field(ge=1, le=5000, description="How many lines to show")] = 2000,
    ) -> FileText:
        """Line-numbered text of an in-scope file. Other paths are refused."""
        return research.read_file(path, offset, limit)

    @mcp.tool(annotations=EDITS)
    @agent_errors
    def edit_train(
        old_text: Annotated[str, Field(description="Exact text to replace; must occur exactly once in train.py", max_length=1_000_000)],
        new_text: Annotated[str, Field(description="Replacement text", max_length=1_000_000)],
    ) -> EditResult:
        """Replace one exact, unique occurrence of old_text in training/train.py; returns the diff hunk."""
        return research.edit_train(old_text, new_text)

    @mcp.tool(annotations=EDITS)
    @agent_errors
    def write_train(
        content: Annotated[str, Field(description="The whole new training/train.py", max_length=1_000_000)],
    ) -> EditResult:
        """Replace the whole of training/train.py."""
        return research.write_train(content)

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    def diff_train() -> DiffResult:
        """Unified diff of train.py against the last kept commit."""
        return research.diff_train()

    @mcp.tool(annotations=RUNS)
    @agent_errors
    async def run_experiment(
        description: Annotated[str, Field(description="One line: what this experiment tries", max_length=2000)],
        ctx: Context,
        max_wait_seconds: MaxWait = None,
    ) -> RunResult:
        """Commit train.py as a candidate on the kept commit (message = description; the branch does not move) and
        train it for the session's budget in a fresh process. Streams progress; returns the result (val_bpb,
        change against the best kept run), or status 'queued'/'running' with the run id if max_wait_seconds
        passes first (0 submits it and returns at once)."""
        return await research.run_experiment(description, max_wait_seconds, progress_reporter(ctx))

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    async def wait_for_run(run_id: RunId, ctx: Context, max_wait_seconds: MaxWait = None) -> RunResult:
        """Wait for a run to end (or max_wait_seconds to pass) and return its result. Finished runs return at once."""
        return await research.wait_for_run(run_id, max_wait_seconds, progress_reporter(ctx))

    @mcp.tool(annotations=RESETS)
    @agent_errors
    def cancel_run(run_id: RunId) -> RunResult:
        """Stop a training run now (its whole process group); it is recorded as cancelled."""
        return research.cancel_run(run_id)

    @mcp.tool(annotations=RUNS)
    @agent_errors
    def keep(run_id: RunId) -> Decision:
        """Keep a succeeded run: the branch fast-forwards to its candidate commit, the new baseline. Refused when
        another keep moved the baseline since the run was made (then rebase_run it and run it again)."""
        return research.keep(run_id)

    @mcp.tool(annotations=RESETS)
    @agent_errors
    def discard(run_id: RunId) -> Decision:
        """Discard a run: the branch stays at the kept commit. train.py goes back to the kept version if it still
        holds exactly this run's code (newer edits stay). The run stays in the ledger and its code stays reachable
        as refs/autoresearch/runs/<run_id>."""
        return research.discard(run_id)

    @mcp.tool(annotations=EDITS)
    @agent_errors
    def rebase_run(run_id: RunId) -> RebaseResult:
        """Re-apply a run's train.py change onto the current kept commit (a three-way merge) in the working tree,
        so it can run again on the new baseline. Conflicts are written into train.py between markers and come
        back as hunks. Refused if train.py holds edits that no run recorded (nothing is lost)."""
        return research.rebase_run(run_id)

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    def results(
        limit: Annotated[int, Field(ge=1, le=10_000, description="Most recent rows to return")] = 50,
    ) -> Results:
        """The session's ledger as rows (commit, val_bpb, memory_gb, status, device, description) with the best
        run, every run in flight with its progress, and the runs awaiting a decision."""
        return research.results(limit)

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    def read_log(
        run_id: RunId,
        tail: Annotated[int, Field(ge=0, le=10_000, description="How many last lines to return")] = 50,
    ) -> LogText:
        """The last lines of a run's training log."""
        return research.read_log(run_id, tail)

    @mcp.tool(annotations=READ_ONLY)
    @agent_errors
    def plot_progress() -> Image:
        """A PNG chart of val_bpb per experiment: every run a point, kept runs highlighted, the running best
        as a step line."""
        research.require_session()
        return Image(data=progress_png(research.ledger.runs(research.session()["tag"])), format="png")

    @mcp.tool(annotations=RUNS)
    @agent_errors
    async def measure_noise(
        ctx: Context,
        repeats: Annotated[int, Field(ge=2, le=20, description="How many seeded re-runs of the kept commit")] = 3,
    ) -> NoiseFloor:
        """Re-run the last kept commit with different seeds (in parallel when the device pool has room) and store
        the spread of val_bpb (the noise floor). From then on each result says whether its change is within noise
        (|change| < 2 sigma). train.py's edits play no part."""
        return await research.measure_noise(repeats, progress_reporter(ctx))

    @mcp.resource("autoresearch://program", mime_type="text/markdown")
    def program() -> str:
        """The agent's research instructions (program.md)."""
        return read_in_scope(research.root, "program.md")

    @mcp.resource("autoresearch://results.tsv", mime_type="text/tab-separated-values")
    def results_tsv() -> str:
        """The session's results in the upstream results.tsv format."""
        path = research.root / RESULTS_NAME
        return path.read_text() if path.exists() else TSV_HEADER

    @mcp.resource("autoresearch://train.py", mime_type="text/x-python")
    def train_py() -> str:
        """The current training/train.py."""
        return read_in_scope(research.root, TRAIN)

    @mcp.resource("autoresearch://runs/{run_id}/log", mime_type="text/plain")
    def run_log(run_id: str) -> str:
        """A run's full training log."""
        try:
            return research.read_log(run_id, 1_000_000).text
        except WorkspaceError as e:
            raise ValueError(str(e)) from e

    @mcp.prompt()
    def autoresearch() -> str:
        """Start an autonomous research session with the instructions of program.md."""
        program_text = read_in_scope(research.root, "program.md")
        return f"{program_text}\n\nBegin now: call status(), then start_session with today's date as the tag."

    mcp.research = research  # tests and the CLI reach the same state the tools use
    return mcp


def serve(settings: Settings, transport: str, host: str, port: int, token: str | None) -> None:
    mcp = create_server(settings)
    mcp.research.harness  # a bad profile or a non-workspace fails here, in plain words, not inside a task group
    mcp.research.claim()  # so does a second server on the same workspace
    if transport == "stdio":
        mcp.run("stdio")
        return
    from server.http import run_http
    run_http(mcp, host, port, token)

