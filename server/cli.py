"""`autoresearch-mcp`: serve the tools, create a workspace, prepare data, connect a client, watch the dashboard,
and read results in the morning.

A failure prints what is wrong and what to type, in a line or two, and exits non-zero; the traceback only with
--debug or AUTORESEARCH_DEBUG=1.
"""

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

from server import layout
from server.errors import WorkspaceError

TEMPLATE_FILES = ("training/prepare.py", "training/train.py", "program.md")  # at least these
WORKSPACE_GITIGNORE = f"{layout.STATE_DIR}/\n{layout.RESULTS_NAME}\nprogress.png\n__pycache__/\n"
# Python 3.10 has no exception groups (anyio brings a backport then); an empty tuple matches nothing
GROUPS = getattr(__import__("builtins"), "BaseExceptionGroup", ())
DEBUG_ENV = "AUTORESEARCH_DEBUG"
SERVER_NAME = "autoresearch"  # the name a client lists the server under
EXECUTABLE = "autoresearch-mcp"
CLIENTS = ("claude", "cursor", "vscode", "json")
DASHBOARD_PORT = 8766  # beside serve's 8765, so both can run at once


def template_root() -> Path:
    """Where the pristine workspace files live: inside the wheel, or the source checkout in editable installs."""
    packaged = Path(__file__).parent / "template"
    return packaged if (packaged / "training" / "prepare.py").exists() else Path(__file__).parent.parent


def harness_dir(workspace: Path) -> Path:
    """The workspace's own training/ when there is one, else the packaged copy (prepare works anywhere)."""
    local = workspace / "training" / "prepare.py"
    return local.parent if local.exists() else template_root() / "training"


def template_files(source: Path) -> list[str]:
    """program.md and every module of training/: the frozen harness (prepare.py and the modules it imports) and
    train.py. Listed from the template itself, so a harness module added later is copied without a change here."""
    return sorted({*TEMPLATE_FILES, *(f"training/{p.name}" for p in (source / "training").glob("*.py"))})


def create_workspace(target: Path) -> None:
    """A new git repository holding the pristine harness, train.py and program.md, committed on main."""
    if target.exists() and any(target.iterdir()):
        raise WorkspaceError(f"{target} exists and is not empty; choose a new directory.")
    source = template_root()
    files = template_files(source)
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    (target / ".gitignore").write_text(WORKSPACE_GITIGNORE)
    git = ["git", "-C", str(target)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "--", *files, ".gitignore"], check=True)
    identity = ["-c", "user.name=autoresearch-mcp", "-c", "user.email=autoresearch@localhost"]
    has_identity = subprocess.run([*git, "config", "user.email"], capture_output=True).returncode == 0
    subprocess.run([*git, *([] if has_identity else identity), "commit", "-q", "-m", "autoresearch workspace"],
                   check=True)


def existing_workspace(path: str) -> Path:
    """An existing directory, resolved; a missing one is named as such (not as a missing ledger or repository)."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise WorkspaceError(f"{root} is not a directory: pass --workspace with the path of a workspace "
                             "(`autoresearch-mcp init DIR` creates one).")
    return root


def cmd_init(args) -> int:
    target = Path(args.dir).expanduser().resolve()
    create_workspace(target)
    print(f"Created a workspace in {target}.")
    print(f"Next: autoresearch-mcp prepare --workspace {target} --dataset sotu, then connect a client: "
          f"autoresearch-mcp config claude --workspace {target} (or cursor, vscode, json)")
    return 0


def cmd_prepare(args) -> int:
    command = [sys.executable, str(harness_dir(Path(args.workspace)) / "prepare.py")]
    for flag in ("dataset", "profile", "num_shards"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    if args.force:
        command.append("--force")
    env = dict(os.environ)
    if args.cache:
        env["AUTORESEARCH_CACHE"] = str(Path(args.cache).expanduser())
    return subprocess.run(command, env=env).returncode


def dataset_argument(value: str | None) -> str | None:
    """A folder given relative to where the command was typed, made absolute: the harness runs in the workspace."""
    if value and Path(value).expanduser().is_dir():
        return str(Path(value).expanduser().resolve())
    return value


def settings_from(args):
    from server.research import Settings

    budget = args.time_budget if args.time_budget is not None else os.environ.get("AUTORESEARCH_TIME_BUDGET")
    cache = args.cache or os.environ.get("AUTORESEARCH_CACHE")
    settings = Settings(
        workspace=Path(args.workspace).expanduser().resolve(),
        profile=args.profile or os.environ.get("AUTORESEARCH_PROFILE"),
        dataset=dataset_argument(args.dataset or os.environ.get("AUTORESEARCH_DATASET")),
        cache=Path(cache).expanduser() if cache else None,
        budget_seconds=float(budget) if budget else None,
    )
    settings.isolation = getattr(args, "isolation", None) or "auto"  # serve --isolation; other commands: auto
    settings.devices = getattr(args, "devices", None)  # serve --devices / --executor / --ray-address
    settings.executor = getattr(args, "executor", None) or "local"
    settings.ray_address = getattr(args, "ray_address", None)
    return settings


def cmd_serve(args) -> int:
    from server.app import serve
    from server.http import load_token

    existing_workspace(args.workspace)
    from server.sandbox import resolve
    resolve(args.isolation)  # --isolation sandbox where no sandbox works: say so now, not at the first run
    check_pool_flags(args)
    token = load_token(args.token_file) if args.transport == "http" else None
    serve(settings_from(args), args.transport, args.host, args.port, token)
    return 0


def check_pool_flags(args) -> None:
    """A bad --devices, --executor ray without Ray, or --ray-address without --executor ray: one line now."""
    from server.pool import parse_devices

    if args.ray_address and args.executor != "ray":
        raise WorkspaceError(f"--ray-address {args.ray_address} needs --executor ray.")
    if args.devices is not None:
        if args.devices.strip().lower().startswith("gpu:") and args.executor != "ray":
            raise WorkspaceError(f"--devices {args.devices} counts a Ray cluster's GPUs and needs --executor ray; "
                                 "on this machine list them: --devices cuda:0,cuda:1 (or auto).")
        parse_devices(args.devices)
    if args.executor == "ray":
        from server.ray_executor import import_ray
        import_ray()


def cmd_results(args) -> int:
    from server.report import print_results

    return print_results(existing_workspace(args.workspace), args.session, args.limit, args.diff)


def cmd_plot(args) -> int:
    from server.report import write_plot

    return write_plot(existing_workspace(args.workspace), args.session, Path(args.output))


def cmd_dashboard(args) -> int:
    from server.dashboard import run_dashboard
    from server.http import load_token

    run_dashboard(existing_workspace(args.workspace), args.host, args.port, load_token(args.token_file))
    return 0


def executable() -> list[str]:
    """This installation's command as absolute paths: the console script beside the running interpreter (a venv's
    bin/, found even when that venv is not on PATH), else the one that was run, else `python -m server.cli`."""
    interpreter = Path(os.path.abspath(sys.executable))  # not resolved: a venv's python is a symlink out of it
    for candidate in (interpreter.parent / EXECUTABLE, Path(os.path.abspath(sys.argv[0]))):
        if candidate.name == EXECUTABLE and candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return [str(interpreter), "-m", "server.cli"]


def client_config(client: str, workspace: Path, extra: list[str]) -> str:
    """The exact text to paste for a client: a shell command for Claude Code, JSON for the others."""
    command, *prefix = executable()
    args = [*prefix, "serve", "--workspace", str(workspace), *extra]
    if client == "claude":
        return shlex.join(["claude", "mcp", "add", SERVER_NAME, "--", command, *args])
    entry = {"command": command, "args": args}
    if client == "vscode":  # .vscode/mcp.json names its table "servers" and wants the transport type
        return json.dumps({"servers": {SERVER_NAME: {"type": "stdio", **entry}}}, indent=2)
    return json.dumps({"mcpServers": {SERVER_NAME: entry}}, indent=2)


CONFIG_WHERE = {
    "claude": "run this command (Claude Code); `claude mcp list` should then show the server as connected",
    "cursor": "put this in ~/.cursor/mcp.json (every project) or .cursor/mcp.json (one project)",
    "vscode": "put this in .vscode/mcp.json of your project (VS Code agent mode)",
    "json": "put this in a project's .mcp.json (Claude Code) or any client's mcpServers settings",
}


def cmd_config(args) -> int:
    workspace = existing_workspace(args.workspace)
    extra = []
    for flag in ("profile", "dataset", "cache", "time_budget"):
        value = getattr(args, flag)
        if value is not None:
            extra += [f"--{flag.replace('_', '-')}", str(Path(value).expanduser().resolve()) if flag == "cache"
                      else str(value)]
    if not (workspace / "training" / "prepare.py").exists():
        print(f"# note: {workspace} is not a workspace yet (no training/prepare.py): "
              f"autoresearch-mcp init {workspace} creates one", file=sys.stderr)
    print(f"# {CONFIG_WHERE[args.client]}", file=sys.stderr)  # stdout stays pasteable
    print(client_config(args.client, workspace, extra))
    return 0


def cmd_demo(args) -> int:
    from server.demo import run_demo

    return run_demo(args)


def add_workspace(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", default=".", help="the workspace git repository (default: current directory)")


def add_harness_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", help="gpu | small | cpu | smoke (default: picked from the device)")
    p.add_argument("--dataset", help="sotu | climbmix | tinystories | a folder of .txt/.jsonl/.parquet files")
    p.add_argument("--cache", help="data and tokenizer cache (default: $AUTORESEARCH_CACHE or ~/.cache/autoresearch)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="autoresearch-mcp", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the MCP server (stdio by default)")
    add_workspace(p)
    add_harness_flags(p)
    p.add_argument("--time-budget", type=float, help="shorten each run's training budget (seconds)")
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765)")
    p.add_argument("--token-file", help="file holding the bearer token (else $AUTORESEARCH_TOKEN)")
    p.add_argument("--devices", help="run several experiments at once: auto (every local GPU, else one CPU slot), "
                                     "cuda:0,cuda:1, cpu:N (the cores split into N slots), or with --executor ray gpu:N (N "
                                     "runs on the cluster's GPUs); runs beyond the free "
                                     "slots wait as queued (default: the harness's one device, one run at a time)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where runs train: this machine, or a Ray cluster (pip install \"autoresearch-mcp[ray]\")")
    p.add_argument("--ray-address", help="with --executor ray: the cluster's head (ADDR, auto), or local for a "
                                         "private one-machine Ray instance (default auto)")
    p.add_argument("--isolation", choices=["auto", "sandbox", "none"], default="auto",
                   help="the trainer's sandbox: auto (bubblewrap where it works), sandbox (required), none")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("init", help="create a fresh workspace repository from the packaged files")
    p.add_argument("dir")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("prepare", help="download/verify data, train the tokenizer, tokenize (once per dataset)")
    add_workspace(p)
    add_harness_flags(p)
    p.add_argument("--num-shards", type=int, help="climbmix: how many training shards to download")
    p.add_argument("--force", action="store_true", help="rebuild the cache for this dataset")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("results", help="print the session's results table, the best run and what changed in it")
    add_workspace(p)
    p.add_argument("--session", help="session tag (default: the checked-out one, else the latest)")
    p.add_argument("--limit", type=int, default=0, help="only the last N rows (default: all)")
    p.add_argument("--diff", action="store_true", help="also print the best run's full train.py diff")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("plot", help="write the progress chart as PNG")
    add_workspace(p)
    p.add_argument("--session", help="session tag (default: the checked-out one, else the latest)")
    p.add_argument("-o", "--output", default="progress.png")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("dashboard", help="serve a live, read-only page of the runs (also at / of serve --transport http)")
    add_workspace(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT, help=f"port (default {DASHBOARD_PORT})")
    p.add_argument("--token-file", help="file holding the bearer token (else $AUTORESEARCH_TOKEN)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("config", help="print the command or JSON that connects a client to this server")
    p.add_argument("client", choices=CLIENTS, help="claude (a command), cursor, vscode or json (JSON)")
    add_workspace(p)
    add_harness_flags(p)
    p.add_argument("--time-budget", type=float, help="shorten each run's training budget (seconds)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("demo", help="drive the server through a short research loop in a fresh workspace")
    p.add_argument("--dir", help="where to create the demo workspace (default: a new temporary directory)")
    p.add_argument("--profile", default="cpu", help="profile for the demo runs (default cpu)")
    p.add_argument("--time-budget", type=float, default=15, help="training seconds per run (default 15)")
    p.add_argument("--experiments", type=int, default=1, choices=range(1, 9), metavar="1-8",
                   help="how many ideas the scripted agent tries after the baseline (default 1)")
    p.add_argument("--cache", help="data and tokenizer cache")
    p.set_defaults(func=cmd_demo)

    for command in sub.choices.values():  # accepted after the command too; SUPPRESS keeps the root's value
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=f"show tracebacks (also {DEBUG_ENV}=1)")
    root.add_argument("--debug", action="store_true", help=f"show tracebacks (also {DEBUG_ENV}=1)")
    return root


def workspace_error_in(error: BaseException) -> WorkspaceError | None:
    """The WorkspaceError behind an error, looking inside exception groups (anyio task groups wrap what a server
    raises while starting) and through explicit causes."""
    if isinstance(error, WorkspaceError):
        return error
    if isinstance(error, GROUPS):
        for inner in error.exceptions:
            if found := workspace_error_in(inner):
                return found
    if error.__cause__ is not None and error.__cause__ is not error:
        return workspace_error_in(error.__cause__)
    return None


def concise(message: str) -> str:
    """At most two lines: a wrapped tool's own `error:` line first (it says what is wrong), then the last line
    (usually what to type)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 2:
        return "\n".join(lines)
    inner = next((line for line in lines[1:] if line.lower().startswith("error:")), lines[0])
    inner = inner[len("error:"):].strip() if inner.lower().startswith("error:") else inner
    return f"{inner}\n{lines[-1]}"


def main(argv: list[str] | None = None) -> int:
    # stdout belongs to the MCP protocol when serving stdio: everything else logs to stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as e:  # noqa: BLE001 - the last stop before a person reads it
        if isinstance(e, SystemExit):
            raise
        if debug:
            traceback.print_exc()
        known = workspace_error_in(e)
        if known is not None:
            print(f"error: {concise(str(known))}", file=sys.stderr)
            return 2
        if isinstance(e, GROUPS) and len(e.exceptions) == 1:
            e = e.exceptions[0]
        if isinstance(e, OSError) and e.strerror:  # the machine said no (permissions, disk, ports): not a bug
            print(f"error: {e.strerror}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
            return 1
        print(f"error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)
        if not debug:
            print(f"This looks like a bug: run again with --debug (or {DEBUG_ENV}=1) and report the traceback.",
                  file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
