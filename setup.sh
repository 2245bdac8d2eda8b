#!/usr/bin/env bash
# Sets up everything on a fresh machine: system packages (where apt-get can install them), a virtual
# environment in .venv with the CPU/CUDA/MPS build of torch your platform gets by default, this project with its
# dev extras, and the MCP Inspector (a third-party client the tests drive). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"

# bubblewrap sandboxes the trainer; chromium renders the dashboard in the browser test
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
        sudo apt-get update -q >/dev/null
        sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
    else
        echo "setup: install ${need[*]} with your package manager for the sandbox and the browser test" >&2
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build on Linux
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
if command -v npm >/dev/null; then
    npm install --no-audit --no-fund --no-package-lock --loglevel=error >/dev/null
else
    echo "setup: npm not found: the MCP Inspector test will be skipped" >&2
fi
echo "setup: done (.venv ready: . .venv/bin/activate)" >&2
