"""Shared pieces of the benches: load accounting, bottle images, our model and ONNX session, the peer.

Not a public module; bench/side_by_side.py, bench/training.py and bench/ways_in.py import it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mvtec_ad"
BOTTLE = DATA / "bottle"
PEER_PY = REPO / "bench" / ".venv-anomalib" / "bin" / "python"
RESULTS = REPO / "bench" / "results"


# -- load accounting ------------------------------------------------------------------------------
def _machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Load:
    """CPU seconds other processes used while a block ran, and the load averages around it.

    ``others_cpu_s`` = machine busy time - this process (and its waited-for children). A live
    child (the peer worker) counts as "other" here, so callers subtract what they know it used.
    ``others_share`` = others_cpu_s / (wall * cores): 0 quiet, 1 both cores taken by others.
    """

    def __enter__(self):
        self.load_before = [round(v, 2) for v in os.getloadavg()]
        self._m, self._o, self._w = _machine_busy_ticks(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        hz = os.sysconf("SC_CLK_TCK")
        self.wall_s = time.perf_counter() - self._w
        self.machine_cpu_s = (_machine_busy_ticks() - self._m) / hz
        self.own_cpu_s = _own_cpu_s() - self._o
        self.others_cpu_s = max(0.0, self.machine_cpu_s - self.own_cpu_s)
        self.load_after = [round(v, 2) for v in os.getloadavg()]

    def summary(self, known_child_cpu_s: float = 0.0) -> dict:
        others = max(0.0, self.others_cpu_s - known_child_cpu_s)
        cores = os.cpu_count() or 1
        return {"wall_s": round(self.wall_s, 1), "others_cpu_s": round(others, 1),
                "others_share": round(others / max(1e-9, self.wall_s * cores), 2),
                "load_avg_before": self.load_before, "load_avg_after": self.load_after}


def other_processes(top: int = 6) -> list[str]:
    """The busiest other processes right now (ps), for the record."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True,
                             text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    me = str(os.getpid())
    rows = [r.strip()[:160] for r in out[1:] if r.split()[0] != me]
    return rows[:top]


# -- data, models ---------------------------------------------------------------------------------
def bottle_batch(model, n: int) -> torch.Tensor:
    """n real bottle test images (cycled), preprocessed for ``model`` (resize to its input size)."""
    from fastflow.data.preprocess import load_image
    from fastflow.run import preprocess_for

    pre = preprocess_for(model)
    files = sorted((BOTTLE / "test").glob("*/*.png"))
    if not files:
        raise SystemExit(f"no bottle test images under {BOTTLE / 'test'}")
    cache: dict[Path, torch.Tensor] = {}
    out = []
    for i in range(n):
        f = files[(i * 7) % len(files)]  # a spread over the defect types
        if f not in cache:
            cache[f] = pre(load_image(f))
        out.append(cache[f])
    return torch.stack(out).contiguous()


def lite0_model(kernels: str | None = None, backbone=None, **overrides):
    """The efficientnet_lite0 preset's model (pretrained backbone, fresh flows), in eval mode;
    ``overrides``: ModelConfig fields (hidden_ratio=1.0, ...)."""
    from dataclasses import replace

    from fastflow.config import get_preset
    from fastflow.model import FastFlow

    cfg = get_preset("efficientnet_lite0").model
    if kernels:
        overrides["kernels"] = kernels
    if overrides:
        cfg = replace(cfg, **overrides)
    return FastFlow(cfg, weights="pretrained", backbone=backbone).eval()


def onnx_session(model, threads: int = 2, spinning: bool = False, path: str | None = None):
    """Export ``model`` (score, map) with fastflow.export's exporter, parity-check, open an ORT session."""
    import onnxruntime as ort

    from fastflow.export import ScoreAndMap, _export, _name_output_shapes, check_parity

    h, w = model.config.input_size
    path = path or os.path.join(tempfile.mkdtemp(prefix="ffbench-"), "lite0.onnx")
    t0 = time.perf_counter()
    _export(ScoreAndMap(model).eval(), torch.randn(2, 3, h, w), path, 18, "torchscript")
    _name_output_shapes(path, h, w)
    export_s = time.perf_counter() - t0
    parity = check_parity(path, model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spinning:  # no busy-waiting: it would steal the cores the next timed runtime needs
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session, {"export_s": round(export_s, 1), "parity_max_abs_diff_map": parity["max_abs_diff_map"],
                     "onnxruntime": ort.__version__, "spinning": spinning}


def torch_runner(model, x: torch.Tensor):
    """Our torch inference as the Predictor runs it: the inference form (fused.for_inference)."""
    from fastflow.fused import for_inference

    model = for_inference(model)

    def run():
        with torch.inference_mode():
            out = model(x)
            return float(out.score[0])  # materialised
    return run


def ort_runner(session, x: torch.Tensor):
    from fastflow.run import INPUT_NAME, OUTPUT_NAMES

    arr = x.numpy()

    def run():
        score, _amap = session.run(list(OUTPUT_NAMES), {INPUT_NAME: arr})
        return float(score[0])
    return run


def time_calls(fn, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def med_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 2)


def ips(times: list[float], batch: int) -> float:
    return round(batch / statistics.median(times), 2)


# -- the peer (anomalib), in its own venv -----------------------------------------------------------
class PeerWorker:
    """bench/peer/peer_worker.py in the anomalib venv: times its forwards on request."""

    def __init__(self, threads: int = 2):
        if not PEER_PY.exists():
            raise SystemExit(f"{PEER_PY} missing: run bash bench/peer/setup.sh")
        self.proc = subprocess.Popen([str(PEER_PY), str(REPO / "bench" / "peer" / "peer_worker.py"),
                                      "--threads", str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
        self.info = json.loads(self.proc.stdout.readline())
        assert self.info.get("ready"), self.info

    def cpu_s(self) -> float:
        """CPU seconds the worker has used so far (from /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def time(self, batch: int, runs: int, warmup: int = 0) -> list[float]:
        self.proc.stdin.write(json.dumps({"batch": batch, "runs": runs, "warmup": warmup}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def run_peer_script(*extra: str, timeout: float = 1800) -> dict:
    """bench/peer/anomalib_fastflow.py as documented (its own JSON), with ``extra`` options."""
    cmd = [str(PEER_PY), str(REPO / "bench" / "peer" / "anomalib_fastflow.py"), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"peer script failed ({out.returncode}): {out.stderr[-2000:]}")
    text = out.stdout
    return json.loads(text[text.index("{"):])


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def environment(threads: int) -> dict:
    import platform

    return {"torch": torch.__version__, "python": sys.version.split()[0], "threads": threads,
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "numpy": np.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
