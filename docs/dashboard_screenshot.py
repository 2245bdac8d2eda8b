"""Remake docs/dashboard.png: a demo session with a noise floor, photographed while a run is evaluating.

    python docs/dashboard_screenshot.py [--dir /tmp/dashboard-demo] [--cache DIR]

Runs the demo (smoke profile), measures the noise floor, starts one more run and takes the screenshot with
headless Chromium once that run has scored 40% of its validation rows. A few minutes on a laptop CPU.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

OUTPUT = Path(__file__).resolve().parent / "dashboard.png"
SHOWN_RUN = "r0003"  # the run whose diff the picture opens: the demo's second idea
WINDOW = "1300,1320"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def photograph(workspace: Path, cache: str | None, url: str) -> None:
    def state() -> dict:
        with urllib.request.urlopen(url + "api/state", timeout=30) as response:
            return json.load(response)

    args = ["-m", "server.cli", "serve", "--workspace", str(workspace), "--profile", "smoke", "--dataset", "sotu"]
    params = StdioServerParameters(command=sys.executable, args=args + (["--cache", cache] if cache else []),
                                   env=dict(os.environ))
    async with Client(params) as client:
        await client.call_tool("start_session", {"tag": "demo", "resume": True})
        await client.call_tool("measure_noise", {"repeats": 2})
        source = (workspace / "training" / "train.py").read_text()
        line = re.search(r"^SCALAR_LR\s*=\s*([0-9.]+)", source, re.M)
        await client.call_tool("edit_train", {"old_text": line.group(0),
                                              "new_text": f"SCALAR_LR = {float(line.group(1)) / 2:.3g}"})
        started = await client.call_tool("run_experiment", {"description": "SCALAR_LR x0.5", "max_wait_seconds": 0})
        run_id = started.structured_content["run_id"]
        while not ((run := state()["running"]) and run["phase"] == "evaluating" and (run["eval_percent"] or 0) >= 40):
            await anyio.sleep(0.2)
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={WINDOW}", f"--user-data-dir={workspace / '.chromium'}",
                        "--virtual-time-budget=1500", f"--screenshot={OUTPUT}", f"{url}#{SHOWN_RUN}"],
                       check=True, capture_output=True)
        await client.call_tool("wait_for_run", {"run_id": run_id})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/dashboard-demo", help="a new folder for the demo workspace")
    parser.add_argument("--cache", help="data and tokenizer cache")
    args = parser.parse_args()
    workspace = Path(args.dir).resolve()
    cache = ["--cache", args.cache] if args.cache else []
    subprocess.run([sys.executable, "-m", "server.cli", "demo", "--dir", str(workspace), "--profile", "smoke",
                    "--time-budget", "8", "--experiments", "5", *cache], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    dashboard = subprocess.Popen([sys.executable, "-m", "server.cli", "dashboard", "--workspace", str(workspace),
                                  "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"http://\S+/", dashboard.stderr.readline()).group(0)
        time.sleep(2)
        anyio.run(photograph, workspace, args.cache, url)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
