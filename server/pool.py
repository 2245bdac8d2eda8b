"""The device pool of `serve --devices auto|cuda:0,cuda:1|cpu:N`: which slots runs may train on, what each run's
environment gets so it stays on its slot, and the machine-wide locks a slot takes.

- `cuda:K` is one slot per listed GPU; its run sees only that GPU (CUDA_VISIBLE_DEVICES=K, so torch calls it cuda:0).
- `cpu:N` splits this machine's cores into N slots of consecutive cores; a run's torch threads are set to its
  slot's core count (OMP_NUM_THREADS and friends) and the launcher is pinned to those cores where the OS allows.
- `auto` is every local GPU (found without importing torch: nvidia-smi -L, else /proc/driver/nvidia/gpus), else
  one CPU slot of all cores.

Locks: a GPU slot takes the lock of its GPU (`cuda:K`, the name server/executor.py always used). A CPU slot takes one
lock per core it uses (`cpu0`, `cpu1`, ...), all or none (the one slot of `cpu:1` also takes the whole machine's
`cpu` lock, as servers always did): two servers that share `cpu:2` take the same two core
locks, and a server with `cpu:1` (every core) excludes both, so the cores are never oversubscribed whatever pools
the servers on this machine were started with. The locks are flocks held by each run's launcher (one descriptor
per lock passed to it), so a dead holder frees them by itself.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import WorkspaceError
from server.executor import DeviceLock, acquire_device

AUTO = "auto"
CPU_LOCK = "cpu{}"  # one lock per core
# Variables that size a CPU run's thread pools (torch reads OMP_NUM_THREADS; the BLAS libraries their own).
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "NUMEXPR_NUM_THREADS")
# A CPU run's threads are its cores less those other processes keep busy when it starts, measured over this long.
# More threads than the cores a run really gets make torch's OpenMP threads wait for one another at every kernel:
# on a 2-core box with one core kept busy by another program, the cpu profile's step took 12.6 s with 2 threads
# and 3.2 s with 1 (1.5 s on the quiet machine with 2).
LOAD_SAMPLE_SECONDS = 0.3
NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")
NVIDIA_SMI_TIMEOUT = 10  # seconds; a wedged driver must not hang the server's start
DEVICES_HELP = ("pass --devices auto (every local GPU, else one CPU slot), --devices cuda:0,cuda:1 (those GPUs) or "
                "--devices cpu:N (this machine's cores split into N slots)")


@dataclass(frozen=True)
class Slot:
    """One place a run can train: `name` is what the ledger and status show, `device` the torch device type the
    run uses, `locks` the machine-wide lock names it holds, `env` what its run's environment gets."""

    name: str
    device: str
    locks: tuple[str, ...]
    env: dict = field(default_factory=dict, hash=False, compare=False)
    cores: tuple[int, ...] | None = None  # CPU affinity of the run, None to leave it


@dataclass
class SlotLock:
    """The held locks of one slot: what the launcher inherits (fds) and releases by dying."""

    slot: Slot
    locks: list[DeviceLock]

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(lock.fd for lock in self.locks)

    @property
    def fd(self) -> int:  # the DeviceLock interface: the first lock names the holder
        return self.locks[0].fd

    @property
    def device(self) -> str:
        return self.slot.name

    @property
    def path(self) -> Path:
        return self.locks[0].path

    def release(self) -> None:
        for lock in self.locks:
            lock.release()

    def describe_holder(self, info: dict) -> None:
        for lock in self.locks:
            lock.describe_holder(info)


# ---------------------------------------------------------------- parsing


def usable_cores() -> list[int]:
    """The cores this process may run on (a container or taskset may give it fewer than the machine has)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity: every core
        return list(range(os.cpu_count() or 1))


def local_gpus() -> list[int]:
    """Indices of this machine's NVIDIA GPUs, without importing torch: nvidia-smi -L, else the driver's /proc
    folder. An empty list when there are none (or no NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT).stdout
            found = [int(m.group(1)) for m in re.finditer(r"^GPU (\d+):", out, re.MULTILINE)]
            if found:
                return found
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        return list(range(len(list(NVIDIA_PROC.iterdir()))))
    except OSError:
        return []


def cpu_slots(count: int, cores: list[int] | None = None) -> list[Slot]:
    """`count` slots of consecutive cores, as even as the cores allow (the first slots get one more)."""
    cores = usable_cores() if cores is None else cores
    if count > len(cores):
        raise WorkspaceError(f"--devices cpu:{count} asks for {count} slots but this machine gives the server "
                             f"{len(cores)} core(s); pass --devices cpu:{len(cores)} or fewer.")
    slots, start = [], 0
    for i in range(count):
        size = len(cores) // count + (1 if i < len(cores) % count else 0)
        mine = tuple(cores[start:start + size])
        start += size
        threads = len(mine)
        name = "cpu" if count == 1 else f"cpu:{i}"
        # the whole-machine slot also takes the `cpu` lock every earlier server took, which names it as the holder
        locks = (("cpu",) if count == 1 else ()) + tuple(CPU_LOCK.format(c) for c in mine)
        slots.append(Slot(name=name, device="cpu", locks=locks,
                          env={**thread_env(threads), "CUDA_VISIBLE_DEVICES": ""}, cores=mine))
    return slots


def gpu_slot(index: int) -> Slot:
    return Slot(name=f"cuda:{index}", device="cuda", locks=(f"cuda:{index}",),
                env={"CUDA_VISIBLE_DEVICES": str(index)})


def ray_gpu_slot(index: int) -> Slot:
    """One of N runs in flight on a Ray cluster's GPUs (--devices gpu:N with --executor ray). The lock only bounds
    how many this machine's servers have in flight; Ray itself hands each run's actor a free GPU on some node."""
    return Slot(name=f"gpu:{index}", device="cuda", locks=(f"ray-gpu{index}",), env={})


def parse_devices(value: str | None, gpus: list[int] | None = None, cores: list[int] | None = None) -> list[Slot]:
    """The slots of a --devices value; WorkspaceError in one line for a bad one. `gpus` and `cores` stand in for
    this machine's (tests)."""
    text = (value or AUTO).strip().lower()
    if text == AUTO:
        found = local_gpus() if gpus is None else gpus
        return [gpu_slot(i) for i in found] if found else cpu_slots(1, cores)
    if m := re.fullmatch(r"cpu(?::(\d+))?", text):
        count = int(m.group(1) or 1)
        if count < 1:
            raise WorkspaceError(f"--devices {value}: at least one slot; {DEVICES_HELP}.")
        return cpu_slots(count, cores)
    if m := re.fullmatch(r"gpu:(\d+)", text):  # a Ray cluster's GPUs: Ray picks the node and the card
        count = int(m.group(1))
        if count < 1:
            raise WorkspaceError(f"--devices {value}: at least one slot; {DEVICES_HELP}.")
        return [ray_gpu_slot(i) for i in range(count)]
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"cuda:\d+", p) for p in parts):
        raise WorkspaceError(f"--devices {value!r} is not understood; {DEVICES_HELP}.")
    indices = [int(p.split(":")[1]) for p in parts]
    if len(set(indices)) != len(indices):
        raise WorkspaceError(f"--devices {value}: a GPU is listed twice; list each once (e.g. cuda:0,cuda:1).")
    found = local_gpus() if gpus is None else gpus
    if missing := [i for i in indices if i not in found]:
        have = ", ".join(f"cuda:{i}" for i in found) or "none"
        raise WorkspaceError(f"--devices {value}: no GPU {', '.join(f'cuda:{i}' for i in missing)} on this machine "
                             f"(found: {have}); `nvidia-smi -L` lists them.")
    return [gpu_slot(i) for i in indices]


# ---------------------------------------------------------------- the pool


class Pool:
    """The slots of one server. A slot is free when every one of its machine-wide locks is free; any server on
    this machine may hold it."""

    def __init__(self, slots: list[Slot]):
        if not slots:
            raise WorkspaceError(f"The device pool is empty; {DEVICES_HELP}.")
        self.slots = list(slots)

    @classmethod
    def from_devices(cls, value: str | None) -> "Pool":
        return cls(parse_devices(value))

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def device(self) -> str:
        """The torch device type the pool's runs use (a pool is all GPUs or all CPU slots)."""
        return self.slots[0].device

    def describe(self) -> str:
        return ", ".join(s.name for s in self.slots)

    def try_slot(self, slot: Slot) -> SlotLock | None:
        """All of the slot's locks, or None (nothing held) when any of them is taken."""
        held: list[DeviceLock] = []
        try:
            for name in slot.locks:
                held.append(acquire_device(name))
        except WorkspaceError:
            for lock in held:
                lock.release()
            return None
        return SlotLock(slot, held)

    def acquire(self) -> SlotLock | None:
        """The first free slot, held; None when every slot is busy (here or in another server)."""
        for slot in self.slots:
            if (held := self.try_slot(slot)) is not None:
                return held
        return None

    def busy_error(self) -> WorkspaceError:
        """Why nothing is free, naming who holds the first slot (the executor's busy message)."""
        slot = self.slots[0]
        for name in slot.locks:
            try:
                acquire_device(name).release()
            except WorkspaceError as e:
                if self.size == 1:
                    return e
                return WorkspaceError(f"All {self.size} device slots ({self.describe()}) are busy. {e}")
        return WorkspaceError(f"All {self.size} device slots ({self.describe()}) are busy.")


def thread_env(threads: int) -> dict:
    return dict.fromkeys(THREAD_ENV, str(threads))


def spare_threads(limit: int, sample: float = LOAD_SAMPLE_SECONDS) -> tuple[int, float]:
    """(threads for a CPU run starting now, cores other processes keep busy): at most `limit`, one per core this
    process may use that is not busy now (rounded), at least one."""
    import psutil

    cores = usable_cores()
    per_cpu = psutil.cpu_percent(interval=sample, percpu=True)
    busy = sum(per_cpu[c] for c in cores if c < len(per_cpu)) / 100
    return max(1, min(limit, round(len(cores) - busy))), busy


def run_env(env: dict, slot: Slot) -> dict:
    """A run's environment on its slot."""
    return {**env, **slot.env}


def pin_to_cores(pid: int, slot: Slot) -> None:
    """Keep a CPU run on its slot's cores: the launcher's affinity is inherited by everything it starts after this
    (it spawns its first child only after its imports, long after Popen returned). Best effort: macOS has no
    affinity, and a core this process may not use is left alone."""
    if slot.cores is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(pid, slot.cores)
    except OSError as e:
        print(f"autoresearch: could not pin run to cores {slot.cores}: {e}", file=sys.stderr)


class PoolExecutor:
    """Runs on this machine on the pool's slots: the executor interface of server/executor.py (acquire a device,
    launch a run on it) for several devices. The run's launcher inherits every lock of its slot; the slot's env
    reaches the trainer, feeder and evaluator through the spec, and a CPU run is pinned to its cores."""

    name = "local"

    def __init__(self, pool: Pool, python: str = sys.executable):
        self.pool = pool
        self.python = python

    @property
    def device(self) -> str:
        return self.pool.device

    def acquire(self) -> SlotLock:
        held = self.pool.acquire()
        if held is None:
            raise self.pool.busy_error()
        return held

    def try_acquire(self) -> SlotLock | None:
        return self.pool.acquire()

    def ensure_free(self) -> None:
        self.acquire().release()

    def launch(self, lock: SlotLock, spec: dict, cwd: Path, env: dict, log_path: Path,
               result_fd: int) -> subprocess.Popen:
        slot = lock.slot
        spec = {**spec, "python": spec.get("python") or self.python, "executor": "local", "device": slot.device,
                "slot": slot.name, "env": run_env(spec["env"], slot)}
        command = [sys.executable, "-I", "-m", "server.launcher", str(os.getpid()), "--result-fd", str(result_fd),
                   "--spec", json.dumps(spec)]
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(command, cwd=cwd, env=run_env(env, slot), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     pass_fds=(*lock.fds, result_fd))
        pin_to_cores(popen.pid, slot)
        return popen

    def close(self) -> None:
        pass


def make_executor(settings) -> dict:
    """RunManager's executor arguments for a server's settings (--devices, --executor, --ray-address): {} for the
    harness's one device as before (no pool, no queue); else the pool's executor, with queueing."""
    executor = getattr(settings, "executor", "local") or "local"
    devices, address = getattr(settings, "devices", None), getattr(settings, "ray_address", None)
    if executor not in ("local", "ray"):
        raise WorkspaceError(f"--executor {executor} is not known; pass --executor local (this machine) or ray.")
    if address and executor != "ray":
        raise WorkspaceError(f"--ray-address {address} needs --executor ray.")
    if devices is None and executor == "local":
        return {}
    if executor != "ray" and (devices or "").strip().lower().startswith("gpu:"):
        raise WorkspaceError(f"--devices {devices} counts a Ray cluster's GPUs and needs --executor ray; on this "
                             "machine list them: --devices cuda:0,cuda:1 (or auto).")
    pool = Pool.from_devices(devices)
    if executor == "ray":
        from server.ray_executor import RayExecutor
        return {"executor": RayExecutor(pool, address or "auto", settings.python), "queue": True}
    return {"executor": PoolExecutor(pool, settings.python), "queue": True}
