"""The live dashboard: one read-only page over a workspace, for the human checking on a night of runs.

Everything comes from disk, so the page works beside a running server or after it stopped: the ledger for runs,
decisions and the noise floor, each run's log for live progress, git for each run's diff, the same chart as
plot_progress. The page (dashboard.html, plain HTML and a little JS, no build step, nothing fetched from the
internet) polls /api/state every few seconds. Served by `autoresearch-mcp dashboard` and at / of the HTTP transport.
"""

import json
import sys
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from server.errors import WorkspaceError
from server.gitops import RUN_ID_RE, Git
from server.layout import log_path
from server.ledger import Ledger, ran_on, row_status
from server.plot import progress_png
from server.report import pick_session
from server.research import NOISE_SIGMAS
from server.runs import LogReader

PAGE = Path(__file__).with_name("dashboard.html")
LOG_TAIL_LINES = 400          # what the page shows of a run's log
LOG_TAIL_BYTES = 512 * 1024   # never read more than this of a log to show its end
LIVE_LOG_LINES = 6            # the newest lines shown under the progress bar
READ_ONLY_METHODS = ("GET", "HEAD")
LIVE_STATUSES = ("queued", "starting", "running")  # a run the ledger has not closed yet


def tail_text(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - LOG_TAIL_BYTES))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class Board:
    """The dashboard's view of one workspace. Log readers are kept per running run, so each poll reads only the
    bytes a run appended since the last one; the chart is redrawn only when a run changed."""

    def __init__(self, root: Path):
        self.root = root
        self.ledger = Ledger(root)
        self.git = Git(root)
        self.readers: dict[str, LogReader] = {}
        self.lock = threading.Lock()
        self.chart_key: str | None = None
        self.chart: bytes = b""

    def session(self) -> dict | None:
        try:
            return pick_session(self.root, self.ledger, None)
        except WorkspaceError:
            return None

    def runs(self, session: dict | None) -> list[dict]:
        return self.ledger.runs(session["tag"]) if session else []

    def state(self) -> dict:
        session = self.session()
        runs = self.runs(session)
        noise = self.ledger.noise(session.get("profile"), session.get("dataset")) if session else None
        std = noise["std"] if noise and noise.get("std") else None
        rows, best = [], None
        for run in runs:
            delta = (run["val_bpb"] - best["val_bpb"]
                     if best is not None and isinstance(run.get("val_bpb"), (int, float)) else None)
            sigma = delta / std if delta is not None and std else None
            rows.append(self.row(run, delta, sigma, ran_on(run, runs)))
            if run.get("decision") == "keep" and isinstance(run.get("val_bpb"), (int, float)):
                if best is None or run["val_bpb"] < best["val_bpb"]:
                    best = run
        running = [self.live(run) for run in runs if run.get("status") in LIVE_STATUSES]
        with self.lock:  # a finished run's reader is not needed again
            live_ids = {run["run_id"] for run in running}
            self.readers = {run_id: r for run_id, r in self.readers.items() if run_id in live_ids}
        return {
            "workspace": str(self.root),
            "session": None if session is None else {
                key: session.get(key) for key in ("tag", "branch", "profile", "dataset", "base_commit")},
            "budget_seconds": runs[-1].get("budget_seconds") if runs else None,
            "runs": rows,
            "best": None if best is None else {"run_id": best["id"], "val_bpb": best["val_bpb"]},
            "noise": None if noise is None else {
                "std": noise.get("std"), "mean": noise.get("mean"), "repeats": len(noise.get("values") or []),
                "commit": str(noise.get("commit") or "")[:7], "sigmas": NOISE_SIGMAS},
            "running": running[-1] if running else None,
            "chart_key": self.key(runs),
            "ledger_damaged_lines": self.ledger.damaged_lines,
            "now": time.time(),
        }

    @staticmethod
    def row(run: dict, delta: float | None, sigma: float | None, where: str | None) -> dict:
        metrics = run.get("metrics") if isinstance(run.get("metrics"), dict) else {}
        memory = metrics.get("peak_vram_mb")
        return {
            "run_id": run["id"], "commit": str(run.get("commit") or "")[:7], "description": run.get("description", ""),
            "kind": run.get("kind"), "status": run.get("status"), "decision": run.get("decision"),
            "tsv_status": row_status(run), "val_bpb": run.get("val_bpb"), "delta": delta, "sigma": sigma,
            "within_noise": abs(sigma) < NOISE_SIGMAS if sigma is not None else None,
            "memory_gb": round(memory / 1024, 2) if isinstance(memory, (int, float)) else None,
            "device": run.get("device"), "node": run.get("node"), "ran_on": where,
            "started_at": run.get("started_at"), "ended_at": run.get("ended_at"), "error": run.get("error"),
        }

    def live(self, run: dict) -> dict:
        """The run in progress as its log shows it now. Phase and eval_percent come from the run manager's log
        protocol; a log without `phase:` lines still shows starting, then training."""
        with self.lock:
            reader = self.readers.setdefault(run["id"], LogReader(log_path(self.root, run["id"])))
            reader.read()
            progress = dict(reader.progress)
            recent = list(reader.tail)[-LIVE_LOG_LINES:]
        phase = progress.get("phase") or ("starting" if progress.get("step") is None else "training")
        return {
            "run_id": run["id"], "description": run.get("description", ""), "commit": str(run.get("commit"))[:7],
            "started_at": run.get("started_at"), "budget_seconds": run.get("budget_seconds"),
            "timeout_seconds": run.get("timeout_seconds"), "phase": phase, "percent": progress.get("percent"),
            "eval_percent": progress.get("eval_percent"), "step": progress.get("step"), "loss": progress.get("loss"),
            "seconds_left": progress.get("seconds_left"), "recent": recent,
        }

    @staticmethod
    def key(runs: list[dict]) -> str:
        return str(hash(json.dumps([[r["id"], r.get("status"), r.get("decision"), r.get("val_bpb")] for r in runs])))

    def chart_png(self) -> bytes:
        runs = self.runs(self.session())
        key = self.key(runs)
        with self.lock:
            if key != self.chart_key:
                self.chart, self.chart_key = progress_png(runs), key
            return self.chart

    def run(self, run_id: str) -> dict | None:
        return self.ledger.run(run_id) if RUN_ID_RE.fullmatch(run_id) else None

    def log(self, run_id: str) -> str | None:
        return tail_text(log_path(self.root, run_id), LOG_TAIL_LINES) if self.run(run_id) else None

    def diff(self, run_id: str) -> str | None:
        """train.py as this run changed it: from the kept commit it started from to the run's own commit."""
        run = self.run(run_id)
        if run is None:
            return None
        session = next((s for s in self.ledger.records()
                        if s.get("type") == "session" and s.get("tag") == run.get("session")), {})
        base = run.get("parent") or session.get("base_commit") or f"{run['commit']}^"
        return self.git.diff_between(base, run["commit"])


def host_allowed(request_host: str, names: tuple[str, ...] | None) -> bool:
    """DNS rebinding guard: a loopback-bound page answers only to loopback names (None: any name, a token guards)."""
    if names is None:
        return True
    host = request_host.rsplit(":", 1)[0] if not request_host.endswith("]") else request_host
    return host in names


def dashboard_app(root: Path, bind_host: str = "127.0.0.1") -> Starlette:
    """The page and its JSON/text endpoints; read-only (any other method gets 405)."""
    from server.http import LOOPBACK_NAMES, is_loopback

    board = Board(root)
    board.git.repo  # a folder that is not a repository fails now, in plain words
    names = (LOOPBACK_NAMES + ("::1",) if is_loopback(bind_host)
             else None if bind_host in ("0.0.0.0", "::") else LOOPBACK_NAMES + (bind_host,))

    def guarded(handler):
        async def endpoint(request: Request) -> Response:
            if not host_allowed(request.headers.get("host", ""), names):
                return PlainTextResponse("unknown Host header\n", status_code=421)
            return await run_in_threadpool(handler, request)  # git and disk reads stay off the event loop
        return endpoint

    def page(_request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-store"})

    def state(_request):
        return JSONResponse(board.state(), headers={"Cache-Control": "no-store"})

    def chart(_request):
        return Response(board.chart_png(), media_type="image/png", headers={"Cache-Control": "no-store"})

    def text(getter):
        def handler(request):
            body = getter(request.path_params["run_id"])
            if body is None:
                return PlainTextResponse("no such run\n", status_code=404)
            return PlainTextResponse(body, headers={"Cache-Control": "no-store"})
        return handler

    def failing(handler):  # a git or disk error becomes a short 500, never a traceback page
        def wrapped(request):
            try:
                return handler(request)
            except WorkspaceError as e:
                return PlainTextResponse(f"{e}\n", status_code=500)
        return wrapped

    routes = [
        Route("/", guarded(page), methods=READ_ONLY_METHODS),
        Route("/api/state", guarded(failing(state)), methods=READ_ONLY_METHODS),
        Route("/api/chart.png", guarded(failing(chart)), methods=READ_ONLY_METHODS),
        Route("/api/runs/{run_id}/log", guarded(failing(text(board.log))), methods=READ_ONLY_METHODS),
        Route("/api/runs/{run_id}/diff", guarded(failing(text(board.diff))), methods=READ_ONLY_METHODS),
    ]
    return Starlette(routes=routes)


def run_dashboard(root: Path, host: str, port: int, token: str | None) -> None:
    import uvicorn

    from server.http import BearerTokenMiddleware, check_port, refuse_open_bind, url_for

    refuse_open_bind(host, token)
    app = dashboard_app(root, host)
    check_port(host, port)
    print(f"dashboard of {root}: {url_for(host, port, '/')}"
          + (" (append ?token=YOUR_TOKEN: a bearer token is set)" if token else "") + "; Ctrl-C stops it",
          file=sys.stderr, flush=True)
    uvicorn.run(BearerTokenMiddleware(app, token, query_token=True) if token else app,
                host=host, port=port, log_level="warning")
