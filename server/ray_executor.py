"""`serve --executor ray --ray-address ADDR|auto|local`: each run trains on a node of a Ray cluster.

The seam is the run's trusted launcher (server/launcher.py): it still exists per run on the server's machine,
holds the slot's locks and watches the server. Given a spec with a "ray" entry it calls run_remote here
instead of running the pipeline itself:

  server ── launcher (slot locks, result pipe) ══ Ray ══> NodeRun actor (one GPU or the slot's CPUs, on a node)
              ▲ log chunks, official result                 └─ the node's launcher ── the same run_pipeline(spec)

- run_remote connects to the cluster, creates one NodeRun actor asking for the run's resources and hands it the
  spec (server/pipeline.py) and the candidate's train.py. It writes where the run trains (node, device) as the
  log's first line and into runs/<id>.node.json, streams the node's log into the run's log while it trains, and
  returns the node's official result, which the launcher writes to the result pipe exactly as for a local run.
- On the node, before its first run with this harness and data, the actor checks that `evaluator.py --pins` there
  equals the session's evaluator pins (same harness, same prepared tokenizer and val data), else it refuses with
  the prepare command to run on that node. Then it runs the pipeline under the node's own launcher (the actor is
  that launcher's "server"), with the node's own run folder, cache and compile cache.
- cancel and server death stop the local launcher (on SIGTERM it kills the run's actor first), and the Ray driver
  inside it dies with it. Ray ends the actors of a dead driver once it notices; sooner, an actor whose run nobody
  polled for LEASE_SECONDS takes the run down and exits. A guard process beside each node run takes the node's
  process tree down when its actor dies (Ray kills only an actor's direct children).
- A lost node or worker: the result says stage `interrupted` with the node named, and the run is recorded
  `interrupted`. Nothing waits forever: every Ray call has a timeout.

`--ray-address local` starts a private single-node Ray instance (LocalCluster) for tests and laptops, stopped with
the server (and by its own watcher if the server is killed). Ray is an optional extra, imported only here and only
in Ray mode.
"""

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from server import layout, processes
from server.errors import WorkspaceError

RAY_PIP = 'pip install "autoresearch-mcp[ray]"'
LOCAL = "local"
INTERRUPTED_PREFIX = "autoresearch: interrupted: "  # the log line that says so (the run's error)
NODE_FILE = "node.json"  # runs/<id>.node.json, beside the run dir: where the run trains (executor, node, device)
POLL_SECONDS = 0.25  # how often the client pulls log bytes from the node
CHUNK_BYTES = 1 << 20  # at most this much log per pull
CALL_TIMEOUT = 60.0  # a Ray call that answers in none of this means the node is unreachable
PLACE_TIMEOUT = 600.0  # how long a run may wait for the cluster to have its resources free
HEAD_START_TIMEOUT = 120.0  # `ray start --head` on a busy laptop
HEAD_GRACE = 3.0  # seconds the local head's processes get after SIGTERM
LEASE_SECONDS = 15.0  # a node run nobody has polled for this long is taken down by its actor (driver gone)
NODE_DIR_PREFIX = "autoresearch-node-run-"  # a run's folder in a node's temp folder, removed by its guard
ACTOR_LINGER_SECONDS = 3600.0  # the guard waits this long at most for the actor to go before removing the folder
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # how a client proves itself to a cluster
CHECKED_DIR = Path(tempfile.gettempdir()) / f"autoresearch-ray-{os.getuid()}" / "checked"  # per node, per data


def import_ray():
    """Ray, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise WorkspaceError(f"--executor ray needs Ray, which is not installed here: {RAY_PIP}") from None
    return ray


# ---------------------------------------------------------------- the private local cluster (--ray-address local)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A single-node Ray instance of our own: `ray start --head --block` under a watcher process that tears the
    whole instance down when the server exits, however it exits."""

    def __init__(self, num_cpus: int, num_gpus: int = 0):
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.address: str | None = None
        self.proc: subprocess.Popen | None = None
        self.temp_dir: str | None = None
        # a token of its own: Ray enables token auth by itself when ~/.ray/auth_token exists, and a private
        # instance must not depend on (or be reachable with) whatever token this user has lying around
        self.auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def start(self) -> str:
        ray_cli = Path(sys.executable).parent / "ray"
        if not ray_cli.exists():
            import_ray()  # the clear error when Ray is missing
            raise WorkspaceError(f"Ray is installed but its `ray` command is not beside {sys.executable}: {RAY_PIP}")
        # Ray's socket paths must stay short (Unix sockets: 107 bytes), so not under a deep pytest folder
        self.temp_dir = tempfile.mkdtemp(prefix="ar-ray-", dir="/tmp")
        port = free_port()
        command = [str(ray_cli), "start", "--head", "--block", f"--port={port}", f"--num-cpus={self.num_cpus}",
                   f"--num-gpus={self.num_gpus}", "--include-dashboard=false", "--disable-usage-stats",
                   f"--temp-dir={self.temp_dir}", f"--ray-client-server-port={free_port()}",
                   f"--min-worker-port={port + 1}", f"--max-worker-port={port + 200}"]
        watcher = [sys.executable, "-I", "-m", "server.ray_executor", "head", str(os.getpid()), "--", *command]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **self.auth}
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.proc = subprocess.Popen(watcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        seen: list[str] = []
        ready = threading.Event()

        def read():
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                seen.append(line)
                if "Ray runtime started" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True, name="ray-head-log").start()
        if not ready.wait(HEAD_START_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise WorkspaceError("The local Ray instance did not start: " + " | ".join(seen[-5:]))
        self.address = f"127.0.0.1:{port}"
        return self.address

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the watcher takes the instance down
            try:
                self.proc.wait(HEAD_GRACE + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def watch_head(argv: list[str]) -> None:
    """`python -m server.ray_executor head SERVER_PID -- ray start --head --block ...`: runs the Ray head and takes
    it down (every process it started, Ray's workers included) when told to or when the server is gone."""
    server_pid, command = int(argv[0]), argv[argv.index("--") + 1:]
    head = subprocess.Popen(command)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    tracked: processes.Procs = {}
    while not stopping.is_set() and head.poll() is None and os.getppid() == server_pid:
        tracked.update(processes.run_processes(head.pid, tracked))
        stopping.wait(1.0)
    tracked.update(processes.run_processes(head.pid, tracked))
    tracked[head.pid] = processes.create_time(head.pid) or 0.0
    processes.kill_processes(None, tracked, HEAD_GRACE)
    head.wait()


# ---------------------------------------------------------------- the node side (runs inside a Ray actor)


def node_name() -> str:
    return socket.gethostname()


def node_harness(spec: dict) -> Path:
    """The harness folder this node runs: the session workspace's own when this node sees it (a local cluster, a
    shared file system), else the installed package's. The evaluator's pins decide whether it is the session's."""
    from server.cli import template_root
    from server.harness import EVALUATOR

    workspace = Path(spec["harness_dir"]).parent
    return workspace if (workspace / EVALUATOR).is_file() else template_root()


def check_node(spec: dict, root: Path, cache: str | None) -> None:
    """Once per node, harness and data: `evaluator.py --pins` here must equal the session's evaluator pins, so this
    node scores with the same harness on the same prepared data. Else a clear error naming what to run there."""
    from server.harness import evaluator_pins

    wanted = spec.get("evaluator_pins") or {}
    key = hashlib.sha256(json.dumps([str(root), cache, spec["profile"], spec["dataset"], wanted],
                                    sort_keys=True).encode()).hexdigest()[:24]
    marker = CHECKED_DIR / key
    if marker.exists():
        return
    prepare = f"autoresearch-mcp prepare --dataset {spec.get('dataset_source') or spec['dataset']} " \
              f"--profile {spec['profile']}" + (
        f" --cache {cache}" if cache else "")
    try:
        found = evaluator_pins(root, spec["profile"], spec["dataset"], cache)
    except WorkspaceError as e:
        raise WorkspaceError(f"node {node_name()}: its prepared data cannot be read ({str(e).splitlines()[0]}); "
                             f"run on that node: {prepare}") from None
    if found.get("harness") != wanted.get("harness"):
        raise WorkspaceError(f"node {node_name()}: its harness (training/*.py) differs from the session's pinned "
                             "one; install the same autoresearch-mcp version on every node.")
    if found.get("data") != wanted.get("data"):
        raise WorkspaceError(f"node {node_name()}: its prepared {spec['dataset']} data differs from the session's "
                             f"(fingerprints of the tokenizer and val data); run on that node: {prepare} --force")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"cache": cache, "harness": str(root)}))


def node_spec(spec: dict, base: Path, root: Path, cache: str | None, device: str) -> dict:
    """The server's pipeline spec with this node's paths: its own run and state folders, harness, cache and
    compile cache. The same keys, so the same run_pipeline runs it."""
    from server.harness import HARNESS_DIR, trainer_readable, training_env

    run_dir = base / "run"
    budget = spec["env"].get("AUTORESEARCH_TIME_BUDGET")
    env = training_env(root, profile=spec["profile"], dataset=spec["dataset"], cache=Path(cache) if cache else None,
                       budget=float(budget) if budget else None, result_file=run_dir / layout.RESULT_NAME,
                       seed=int(spec["env"].get("AUTORESEARCH_SEED", 42)))
    env.update(spec.get("slot_env") or {})
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:  # the GPU Ray gave this actor
        env["CUDA_VISIBLE_DEVICES"] = os.environ["CUDA_VISIBLE_DEVICES"]
    harness = Path(root, HARNESS_DIR).resolve()
    readable = [harness]
    if cache:
        readable = trainer_readable(root, Path(cache), spec["dataset"], spec.get("vocab_size"))
    compile_cache = CHECKED_DIR.parent / "compile-cache" / hashlib.sha256(spec["harness_dir"].encode()).hexdigest()[:16]
    return {**{k: v for k, v in spec.items() if k not in ("ray", "slot_env")},
            "run_dir": str(run_dir), "state_dir": str(base), "harness_dir": str(harness),
            "python": sys.executable, "trusted_python": sys.executable, "env": env, "cache": cache,
            "readable": [str(p) for p in readable], "compile_cache": str(compile_cache),
            "evaluator_compile_cache": None,  # a node's temp folder is no place a trainer can never write (macOS)
            "feeder_status": str(base / f"{spec['run_id']}.feeder.json"),
            "executor": "ray", "node": node_name(), "device": device}


class NodeRunBase:
    """One run on one node: `start` checks the node and spawns the run's launcher (the same trusted pipeline as a
    local run) with this actor's process as its "server"; `poll` hands back log bytes and, at the end, the
    official result. A guard process outside the actor's tree takes the run down when the actor dies (Ray kills
    only an actor's direct children)."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.base: Path | None = None
        self.result_fd: int | None = None
        self.result = b""
        self.marker: tuple[str, str] | None = None
        self.polled = time.monotonic()

    def start(self, spec: dict, train_py: str) -> dict:
        ray = sys.modules["ray"]
        context = ray.get_runtime_context()
        gpus = context.get_accelerator_ids().get("GPU") or []
        device = "cuda" if gpus else spec.get("device") or "cpu"
        where = {"executor": "ray", "node": node_name(), "node_id": context.get_node_id(),
                 "node_ip": ray.util.get_node_ip_address(),
                 "device": f"cuda:{gpus[0]}" if gpus else spec.get("slot") or device}  # the GPU Ray gave, or the slot
        cache = os.environ.get("AUTORESEARCH_CACHE") or spec.get("cache")  # a node may keep its data elsewhere
        root = node_harness(spec)
        check_node(spec, root, cache)
        self.base = Path(tempfile.mkdtemp(prefix=f"{NODE_DIR_PREFIX}{spec['run_id']}-"))
        run_dir = self.base / "run"
        run_dir.mkdir()
        (run_dir / layout.RUN_TRAIN_NAME).write_text(train_py, encoding="utf-8")
        mine = node_spec(spec, self.base, root, cache, device)
        read_end, write_end = os.pipe()
        command = [sys.executable, "-I", "-m", "server.launcher", str(os.getpid()), "--result-fd", str(write_end),
                   "--spec", json.dumps(mine)]
        with open(self.base / layout.LOG_NAME, "wb") as log:
            self.proc = subprocess.Popen(command, cwd=run_dir, env=mine["env"], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         pass_fds=(write_end,))
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.result_fd = read_end
        self.marker = (layout.RESULT_ENV, mine["env"][layout.RESULT_ENV])  # every process of the run carries it
        me = os.getpid()
        subprocess.Popen([sys.executable, "-I", "-m", "server.ray_executor", "guard", str(me),
                          str(processes.create_time(me)), str(self.proc.pid), self.marker[1], str(self.base)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True).wait()  # it forks away at once: not our child any more
        self.polled = time.monotonic()
        threading.Thread(target=self.lease, name="node-run-lease", daemon=True).start()
        return {**where, "pid": self.proc.pid}

    def lease(self) -> None:
        """Take the run down when its driver stopped polling (the server's launcher was killed or cancelled the
        run): Ray ends the actors of a dead driver only once it notices, which can take long on a busy machine."""
        tracked: processes.Procs = {}
        while self.proc.poll() is None:
            tracked.update(processes.run_processes(self.proc.pid, tracked))
            if time.monotonic() - self.polled > LEASE_SECONDS:
                tracked[self.proc.pid] = processes.create_time(self.proc.pid) or 0.0
                tracked.update(processes.run_processes(self.proc.pid, tracked, self.marker))
                processes.kill_processes(self.proc.pid, tracked, HEAD_GRACE)
                os._exit(1)  # the actor goes too: nobody will read it
            time.sleep(1.0)

    def read_result(self) -> None:
        while self.result_fd is not None:
            try:
                chunk = os.read(self.result_fd, 65536)
            except BlockingIOError:
                return
            if not chunk or len(self.result) > CHUNK_BYTES:
                os.close(self.result_fd)
                self.result_fd = None
                return
            self.result += chunk

    def poll(self, offset: int) -> dict:
        self.polled = time.monotonic()
        exited = self.proc.poll() is not None  # before reading: every byte written before the exit is in this read
        self.read_result()
        with open(self.base / layout.LOG_NAME, "rb") as f:
            f.seek(offset)
            chunk = f.read(CHUNK_BYTES)
        done = exited and len(chunk) < CHUNK_BYTES
        if done:
            self.read_result()
        return {"log": chunk, "returncode": self.proc.returncode if done else None,
                "result": self.result.decode(errors="replace") if done else None}


def guard_run(argv: list[str]) -> None:
    """`python -m server.ray_executor guard ACTOR_PID ACTOR_CREATE_TIME LAUNCHER_PID MARKER BASE`, detached (it
    forks away from the actor, so Ray's kill of the actor's children spares it): when the actor or the node's
    launcher is gone, it takes what is left of the run down, as the launcher would have had it survived. The run's
    processes are found by the run's environment marker too: Ray SIGKILLs the launcher with its actor, and a
    trainer the launcher spawned since the last look is by then an orphan in a session of its own. Once the actor is
    gone as well (the driver has read the log and the result), the run's folder on the node goes: its train.py, log
    and hand-over (206 MB on the gpu profile) would otherwise pile up in the node's temp folder, run after run."""
    if os.fork():
        os._exit(0)
    actor, started, launcher, marker = int(argv[0]), float(argv[1]), int(argv[2]), argv[3]
    base = Path(argv[4]) if len(argv) > 4 else None
    tracked: processes.Procs = {launcher: processes.create_time(launcher) or 0.0}
    while processes.is_alive(actor, started) and processes.is_alive(launcher, tracked[launcher]):
        tracked.update(processes.run_processes(launcher, tracked))
        time.sleep(0.5)
    # whichever went first (Ray may kill the launcher an instant before the actor): what is left of the run goes.
    # After a run that ended by itself nothing is (the pipeline killed its leftovers), and pids are checked
    # against their start times, so nothing else is touched.
    tracked.update(processes.run_processes(launcher, tracked, (layout.RESULT_ENV, marker)))
    processes.kill_processes(launcher, tracked, HEAD_GRACE)
    deadline = time.monotonic() + ACTOR_LINGER_SECONDS
    while processes.is_alive(actor, started) and time.monotonic() < deadline:
        time.sleep(0.5)
    if base is not None and base.name.startswith(NODE_DIR_PREFIX):
        shutil.rmtree(base, ignore_errors=True)


_node_run = None


def node_run_actor():
    """The NodeRun actor class, made when Ray is first needed (the decorator needs Ray imported)."""
    global _node_run
    if _node_run is None:
        ray = import_ray()
        _node_run = ray.remote(max_restarts=0, max_task_retries=0)(NodeRunBase)
    return _node_run


# ---------------------------------------------------------------- the client (inside the run's local launcher)


def describe_failure(error: BaseException, where: dict | None) -> str:
    node = f"node {where['node']} ({where['node_ip']})" if where else "a node of the cluster"
    kind = type(error).__name__
    detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return f"the Ray worker running this run on {node} was lost ({kind}: {detail})"


def stop_run_with(signum: int, ray, actor) -> None:
    """On `signum` (cancel: the server's SIGTERM to the launcher), kill the run's actor first, then do what the
    launcher does with it. Ray would end the actor of a dead driver by itself too, but only once it notices."""
    previous = signal.getsignal(signum)

    def handler(sig, frame):
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - gone already, or Ray is down: the node's guard still cleans up
            pass
        if callable(previous):
            previous(sig, frame)

    signal.signal(signum, handler)


def run_remote(spec: dict) -> dict:
    """What run_pipeline is to a local run, for a run on the Ray cluster: called by the run's local launcher, it
    ships the spec and the run's train.py to a NodeRun actor, streams the node's log to stdout (the run's log), and
    returns the node's official result, or a failure whose stage says why (`interrupted` when the node or worker
    was lost, `node` when the node refused the run)."""
    failed = {"ok": False, "stage": "node", "error": None, "executor": "ray", "node": None,
              "device": spec.get("device"), "trainer_returncode": None}
    settings = spec["ray"]
    train_py = (Path(spec["run_dir"]) / layout.RUN_TRAIN_NAME).read_text(encoding="utf-8")
    # Ray puts the driver's working folder on its workers' import path: make it the installed package's own
    # folder, never the run folder or a shared /tmp where anyone could plant a module
    os.chdir(Path(__file__).resolve().parent.parent)
    ray = import_ray()
    out = sys.stdout.buffer
    where = None
    try:
        ray.init(address=settings["address"], logging_level="ERROR", log_to_driver=False, configure_logging=False)
    except Exception as e:  # noqa: BLE001 - no cluster there, or it refused us: say where and what to do
        error = (f"could not connect to the Ray cluster at {settings['address']} ({type(e).__name__}: "
                 f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); start it (`ray start --head` "
                 "on its head node) or serve with --ray-address local")
        out.write(f"autoresearch: {error}\n".encode())
        out.flush()
        return {**failed, "error": error}
    try:
        resources = settings["resources"]
        actor = node_run_actor().options(num_cpus=resources.get("num_cpus", 0),
                                         num_gpus=resources.get("num_gpus", 0)).remote()
        stop_run_with(signal.SIGTERM, ray, actor)
        try:
            where = ray.get(actor.start.remote(spec, train_py), timeout=PLACE_TIMEOUT)
        except ray.exceptions.RayTaskError as e:  # the node refused the run (data, harness): its own words
            cause = e.cause if getattr(e, "cause", None) is not None else e
            out.write(f"autoresearch: {cause}\n".encode())
            out.flush()
            return {**failed, "error": str(cause)}
        node_file = Path(spec["run_dir"]).parent / f"{spec['run_id']}.{NODE_FILE}"
        node_file.write_text(json.dumps({k: where[k] for k in ("executor", "node", "node_ip", "node_id", "device")}))
        out.write(f"autoresearch: running on Ray node {where['node']} ({where['node_ip']}), device "
                  f"{where['device']}\n".encode())
        out.flush()
        offset = 0
        while True:
            answer = ray.get(actor.poll.remote(offset), timeout=CALL_TIMEOUT)
            if answer["log"]:
                out.write(answer["log"])
                out.flush()
                offset += len(answer["log"])
            if answer["returncode"] is not None:
                break
            time.sleep(POLL_SECONDS)
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        lines = (answer["result"] or "").strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else None
        except ValueError:
            result = None
        if not isinstance(result, dict):
            return {**failed, "node": where["node"], "device": where["device"],
                    "error": f"the run's launcher on node {where['node']} exited with code {answer['returncode']} "
                             "before the run had a result"}
        return {**result, "executor": "ray", "node": where["node"], "device": where["device"]}
    except (ray.exceptions.RayError, TimeoutError, ConnectionError) as e:
        message = describe_failure(e, where)
        out.write(f"\n{INTERRUPTED_PREFIX}{message}\n".encode())
        out.flush()
        return {**failed, "stage": "interrupted", "error": message, "node": where and where["node"]}


# ---------------------------------------------------------------- the server side


class RayExecutor:
    """Places runs on a Ray cluster through the pool's slots (server/pool.py): the slot's machine-wide locks bound
    how many runs this machine's servers have in flight (with `local`, the same core locks as local runs), Ray
    picks the node and the GPU."""

    name = "ray"

    def __init__(self, pool, address: str, python: str = sys.executable):
        import_ray()  # fail at start, in one line, when Ray is missing
        self.pool = pool
        self.python = python
        self.cluster: LocalCluster | None = None
        self.auth = {k: os.environ[k] for k in AUTH_ENV if k in os.environ}
        if address == LOCAL:
            cores = sum(len(s.cores or ()) for s in pool.slots) or (os.cpu_count() or 1)
            gpus = sum(1 for s in pool.slots if s.device == "cuda")
            self.cluster = LocalCluster(cores, gpus)
            address = self.cluster.start()
            self.auth = dict(self.cluster.auth)
        self.address = address

    @property
    def device(self) -> str:
        return self.pool.device

    def resources(self, slot) -> dict:
        if slot.device == "cuda":
            return {"num_gpus": 1}
        return {"num_cpus": max(1, len(slot.cores or ()))}

    def acquire(self):
        held = self.pool.acquire()
        if held is None:
            raise self.pool.busy_error()
        return held

    def try_acquire(self):
        return self.pool.acquire()

    def ensure_free(self) -> None:
        self.acquire().release()

    def launch(self, lock, spec: dict, cwd: Path, env: dict, log_path: Path, result_fd: int) -> subprocess.Popen:
        """The run's local launcher (holding the slot's locks) with a spec that sends the pipeline to the cluster:
        server/launcher.py hands a spec with a "ray" entry to run_remote instead of running it here."""
        slot = lock.slot
        spec = {**spec, "python": spec.get("python") or self.python, "executor": "ray", "device": slot.device,
                "slot": slot.name, "slot_env": {k: v for k, v in slot.env.items() if k != "CUDA_VISIBLE_DEVICES"},
                "ray": {"address": self.address, "resources": self.resources(slot)}}
        command = [sys.executable, "-I", "-m", "server.launcher", str(os.getpid()), "--result-fd", str(result_fd),
                   "--spec", json.dumps(spec)]
        launcher_env = {**env, **self.auth, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(log_path, "ab") as log:
            return subprocess.Popen(command, cwd=cwd, env=launcher_env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    pass_fds=(*lock.fds, result_fd))

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


def main(argv: list[str]) -> None:
    # through the module's real name, so Ray workers import the actor class from the package instead of
    # receiving a pickled copy of __main__
    from server import ray_executor

    if argv and argv[0] == "head":
        ray_executor.watch_head(argv[1:])
    elif argv and argv[0] == "guard":
        ray_executor.guard_run(argv[1:])
    else:
        sys.exit("usage: python -m server.ray_executor head SERVER_PID -- CMD... | "
                 "guard ACTOR_PID TIME LAUNCHER_PID MARKER BASE")


if __name__ == "__main__":
    main(sys.argv[1:])
