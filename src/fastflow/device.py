"""Where fastflow computes: the device, the numeric precision, and the CPU threads.

    fastflow train ... --device auto|cpu|cuda|cuda:N|mps --precision fp32|bf16|fp16 --threads N
    train(..., device="cuda"), Predictor.from_run(run, device="cuda"), evaluate_model(..., device="cuda")

Device: ``auto`` (the default) takes the first CUDA GPU when there is one, else Apple's ``mps`` when
available, else the CPU. ``resolve_device`` is the one place that turns a user's string into a
``torch.device``; a device this machine does not have is a one-line ``DeviceError`` (a ValueError, so
the CLI exits 2). Models and tensors move at the boundaries (after loading, before the forward);
results come back as CPU numpy; checkpoints are always written as CPU tensors and load onto any device.

Precision: ``fp32`` (default) runs everything in float32. ``bf16`` / ``fp16`` run the backbone and the
flows' convolutions under ``torch.autocast``; the log-determinants, the loss and the anomaly map stay
in float32 (model.py casts them). On CUDA both work; fp16 training uses a gradient scaler. On the CPU
``bf16`` is allowed (PyTorch's CPU autocast is bfloat16; it is faster only on CPUs with AVX512-BF16 or
AMX, slower elsewhere) and ``fp16`` is refused (CPU autocast has no float16 path for these convolutions).

Threads (CPU), the defaults of the CLI (``cli.main``) for a fair share of a shared machine:
  * intra-op threads = the CPUs this process may run on (affinity mask, cgroup CPU quota) that are idle
    when the command starts (measured over 0.2 s from /proc/stat), divided among torchrun's processes on
    this machine (LOCAL_WORLD_SIZE), at least one; ``OMP_NUM_THREADS`` or ``--threads N`` fix it;
  * OpenMP keeps its own wait policy (an idle thread spins a moment before it sleeps: on an idle 2-core
    machine a lite0 training step 1.9x and a batch-1 prediction 2.5x faster than with passive waits), and
    the count follows the load (``follow_load``, called between training steps and prediction batches):
    at most once a second it is set again to the CPUs other processes left idle since the last look, so
    that a neighbour that starts later does not meet two spinning threads (a step 136x slower beside one
    busy core) for more than a step.
The figures: bench/README.md, eleventh round. The Python API changes none of this: call
``device.set_threads(adaptive=True)`` yourself.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

DEVICES = "auto, cpu, cuda, cuda:N, mps"
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision this machine cannot give; the message says what to use instead."""


def resolve_device(text: str | torch.device | None = "auto") -> torch.device:
    """``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` (or a ``torch.device``) -> an available ``torch.device``.

    ``cuda`` means ``cuda:0``. Raises ``DeviceError`` for an unknown string or a device that is not here."""
    if text is None:
        text = "auto"
    if isinstance(text, torch.device):
        text = str(text)
    name = str(text).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {text!r}: use one of {DEVICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name} is not available: this machine has no CUDA GPU "
                              f"(torch.cuda.is_available() is False); use --device cpu or auto")
        index = 0 if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {name} is not available: this machine has {count} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{count - 1}); use --device cuda:0 or auto")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {name} is not available: MPS needs an Apple GPU and a PyTorch built "
                              f"with it (torch.backends.mps.is_available() is False); use --device cpu or auto")
        return torch.device("mps")
    raise DeviceError(f"unknown device {text!r}: use one of {DEVICES}")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None for fp32); DeviceError if not allowed there."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "cpu" and precision == "fp16":
        raise DeviceError("precision fp16 is not supported on the CPU (CPU autocast is bfloat16): use "
                          "--precision bf16 or fp32 on the CPU, or fp16 on a GPU (--device cuda)")
    return _DTYPES[precision]


def autocast(device: torch.device, precision: str = "fp32"):
    """The context in which the backbone and flows run: ``torch.autocast`` for bf16/fp16, nothing for fp32."""
    dtype = check_precision(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def full_float32():
    """No TF32 inside (CUDA convolutions and matmuls in true float32), e.g. for a parity check; a no-op
    on machines without CUDA."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 on CUDA (bf16 has float32's range and needs none)."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu",
                                enabled=precision == "fp16" and device.type == "cuda")


# -- CPU threads -------------------------------------------------------------------------------------
def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _stat_ticks() -> tuple[int, int, int]:
    """(this process's CPUs, their idle ticks, their total ticks) from /proc/stat; raises where it cannot be
    read (not Linux)."""
    allowed = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    idle = total = 0
    with open("/proc/stat") as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] in allowed:
                vals = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
                idle += vals[3] + vals[4]
                total += sum(vals)
    return len(allowed), idle, total


def idle_cpus(seconds: float = 0.2) -> float | None:
    """How many of this process's CPUs were idle over the next ``seconds`` (per-CPU ticks of /proc/stat);
    None where that cannot be read (not Linux)."""
    try:
        n, idle0, total0 = _stat_ticks()
        time.sleep(seconds)
        _, idle1, total1 = _stat_ticks()
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return n * (idle1 - idle0) / (total1 - total0)


def default_threads() -> int:
    """The default thread count: the CPUs this process may use that are idle right now (at least one).

    On a shared machine a thread on a core another process keeps busy does not add speed, it makes the
    others wait for it at every parallel region: beside other work, one thread ran a lite0 training step
    faster than two on the 2-core development box (bench/contention.py --probe; bench/README.md, R9)."""
    cpus = available_cpus()
    idle = idle_cpus()
    if idle is not None:
        cpus = max(1, min(cpus, int(idle + 0.5)))
    return _local_share(cpus)  # torchrun: the processes of this machine share them


def set_threads(threads: int | None = None, adaptive: bool = False) -> int:
    """Set torch's intra-op threads to ``threads`` (default: ``default_threads()``); returns the count.

    Explicit ``OMP_NUM_THREADS`` in the environment is respected when ``threads`` is None. ``adaptive`` (with
    neither): ``follow_load`` keeps the count at the idle CPUs from then on; a fixed count switches it off."""
    global _GOVERNOR
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    _GOVERNOR = None
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS", "").strip()
        fixed = env.isdigit() and int(env) > 0
        threads = int(env) if fixed else default_threads()
        if adaptive and not fixed:
            _GOVERNOR = ThreadGovernor(_local_share(available_cpus()))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def follow_load() -> int:
    """Between two steps of work: with ``set_threads(adaptive=True)``, torch's thread count set again to the
    CPUs other processes leave idle (re-measured at most every ``ThreadGovernor.interval`` seconds); else
    nothing. Returns the count in use."""
    return _GOVERNOR() if _GOVERNOR is not None else torch.get_num_threads()


class ThreadGovernor:
    """Torch's thread count, kept at this process's share of the CPUs that other processes leave idle.

    A call reads only ``clock`` until ``interval`` seconds have passed since the last measurement; then it
    measures (``sample``: busy ticks of this process's CPUs and this process's own ticks, from /proc) how
    many CPUs the other processes kept busy in between and sets ``round(cpus - others)`` threads, between 1
    and ``limit``. ``sample`` and ``clock`` are replaceable in tests."""

    interval = 1.0

    def __init__(self, limit: int, sample=None, clock=time.monotonic):
        self.limit, self.cpus = max(1, limit), available_cpus()
        self.sample, self.clock = sample or _cpu_ticks, clock
        self.since, self.last = clock(), self.sample()

    def __call__(self) -> int:
        threads = torch.get_num_threads()
        now = self.clock()
        seconds = now - self.since
        if seconds < self.interval:
            return threads
        ticks = self.sample()
        if ticks is None or self.last is None:
            self.since, self.last = now, ticks
            return threads
        others = max(0.0, (ticks[0] - self.last[0]) - (ticks[1] - self.last[1])) / _TICKS / seconds
        self.since, self.last = now, ticks
        want = max(1, min(self.limit, int(self.cpus - others + 0.5)))
        if want != threads:
            torch.set_num_threads(want)
        return want


_GOVERNOR: ThreadGovernor | None = None
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _local_share(cpus: int) -> int:
    """``cpus`` divided among torchrun's processes on this machine (LOCAL_WORLD_SIZE), at least one."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cpus // max(1, int(local) if local.isdigit() else 1))


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy clock ticks of this process's CPUs, this process's own ticks, all its threads); None where
    /proc cannot be read (not Linux)."""
    try:
        _, idle, total = _stat_ticks()
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return total - idle, own


# -- memory -----------------------------------------------------------------------------------------
def fits_in_memory(nbytes: int, device: torch.device, fraction: float = 0.5) -> bool:
    """Whether ``nbytes`` may be kept on ``device``: at most ``fraction`` of its free memory (CUDA, from
    ``torch.cuda.mem_get_info``; the rest is left for activations and the flows). The CPU always fits
    (the host is where the fallback goes anyway); mps shares host memory and counts as fitting."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= fraction * free


def to_cpu(obj):
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU: what checkpoints hold."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
