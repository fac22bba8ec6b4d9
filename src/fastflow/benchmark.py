"""Latency and throughput of a trained run on this machine, in torch and (after ``fastflow export``) ONNX Runtime.

    from fastflow.benchmark import measure
    result = measure("runs/bottle", batch_size=1, iterations=50)   # {"runtimes": {"torch": {...}, "onnx": {...}}}

    fastflow benchmark RUN_DIR [--batch-size B] [--iterations N] [--warmup W] [--runtime all|torch|onnx]
                               [--images DIR] [--json FILE] [--device ...] [--threads N]

Two timings per runtime, each over ``iterations`` repetitions after ``warmup`` untimed ones:

- ``model``: the network alone on a preprocessed batch (B, 3, H_in, W_in) float32 -> score, anomaly map;
- ``end_to_end``: ``Predictor.predict_loaded`` on decoded RGB images: preprocessing (resize, normalisation),
  the network, and the map resized back to each image's size. File decoding is left out (it depends on the
  disk and the format, not on the model).

Each reports the median and 90th-percentile latency of one batch (ms) and the throughput at the median
(images/s). Images are synthetic (seeded noise at the run's input size) unless ``images`` names a folder,
whose first ``batch_size`` images (repeated if fewer) are used at their own size.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch

from .predict import Predictor, collect_inputs, load_input
from .run import ONNX_FILE, run_folder

RUNTIME_CHOICES = ("all", "torch", "onnx")


def _timings(fn, iterations: int, warmup: int, batch_size: int) -> dict:
    """Latency statistics (ms) of ``fn()`` over ``iterations`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    median = float(np.median(times))
    return {"median_ms": round(median, 3), "p90_ms": round(float(np.percentile(times, 90)), 3),
            "mean_ms": round(float(np.mean(times)), 3), "min_ms": round(min(times), 3),
            "images_per_s": round(batch_size * 1000.0 / median, 2) if median > 0 else None}


def benchmark_images(predictor: Predictor, batch_size: int, images: str | None = None,
                     seed: int = 0) -> list[tuple[np.ndarray, str | None]]:
    """``batch_size`` decoded (RGB uint8 (H, W, 3), path) pairs: seeded noise at the run's input size, or the
    first images of the folder ``images`` (repeated when it holds fewer)."""
    if images is None:
        h, w = predictor.preprocess.input_size
        rng = np.random.default_rng(seed)
        return [(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), None) for _ in range(batch_size)]
    paths = collect_inputs([images])[:batch_size]
    loaded = [load_input(p) for p in paths]
    return [loaded[i % len(loaded)] for i in range(batch_size)]


def _onnx_missing(run_dir: str, onnx_path: str | None) -> str | None:
    """Why the ONNX runtime cannot be measured (None: it can)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed: pip install 'fastflow[export]'"
    path = onnx_path or os.path.join(run_folder(run_dir), ONNX_FILE)
    if not os.path.isfile(path):
        return f"{path} not found: create it with fastflow export {run_dir} --format onnx"
    return None


def _machine(device: torch.device, threads: int | None) -> dict:
    info = {"device": str(device), "threads": threads or torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def measure(run_dir: str, batch_size: int = 1, iterations: int = 50, warmup: int = 5, runtime: str = "all",
            device: str | torch.device | None = "auto", precision: str = "fp32", threads: int | None = None,
            images: str | None = None, onnx_path: str | None = None) -> dict:
    """Time the run ``run_dir`` (folder or model.pt) on this machine (see the module docstring).

    ``runtime``: all (torch, and ONNX Runtime where ``model.onnx`` and onnxruntime are there; else the reason
    is recorded under ``skipped``), torch or onnx (which then must be available). ``threads``: the CPU
    thread count given to ONNX Runtime (torch's is the process's, ``device.set_threads``).
    Returns {"run", "batch_size", "iterations", "warmup", "images", "input_size", "machine",
    "runtimes": {name: {"model": stats, "end_to_end": stats}}, "skipped": {name: reason}}."""
    from .device import resolve_device

    if runtime not in RUNTIME_CHOICES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}, got {runtime!r}")
    for name, value, least in (("batch size", batch_size, 1), ("iterations", iterations, 1), ("warmup", warmup, 0)):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")
    target = resolve_device(device)
    names, skipped = (["torch"] if runtime in ("all", "torch") else []), {}
    if runtime in ("all", "onnx"):
        missing = _onnx_missing(run_dir, onnx_path)
        if missing and runtime == "onnx":
            raise ValueError(f"cannot benchmark ONNX Runtime: {missing}")
        names += [] if missing else ["onnx"]
        skipped.update({"onnx": missing} if missing else {})
    result = {"run": run_dir, "batch_size": batch_size, "iterations": iterations, "warmup": warmup,
              "images": images or "synthetic", "machine": _machine(target, threads), "runtimes": {},
              "skipped": skipped}
    for name in names:
        predictor = Predictor.from_run(run_dir, runtime=name, onnx_path=onnx_path, batch_size=batch_size,
                                       num_threads=threads, device=target,
                                       precision=precision if name == "torch" else "fp32")
        loaded = benchmark_images(predictor, batch_size, images)
        batch = torch.stack([predictor.preprocess(rgb) for rgb, _ in loaded]).numpy()
        result["input_size"] = list(predictor.preprocess.input_size)
        result["runtimes"][name] = {
            "model": _timings(lambda: predictor.infer(batch), iterations, warmup, batch_size),
            "end_to_end": _timings(lambda: predictor.predict_loaded(loaded, batch_size), iterations, warmup,
                                   batch_size)}
    return result


def format_benchmark(result: dict) -> str:
    """The measurements as a small table."""
    m = result["machine"]
    where = m.get("gpu") or m["processor"]
    size = "x".join(map(str, result.get("input_size", []))) or "?"
    images = "synthetic images at the input size" if result["images"] == "synthetic" else f"images of {result['images']}"
    lines = [f"{result['run']} on {m['device']} ({where}, {m['threads']} thread(s)); input {size}, batch "
             f"{result['batch_size']}, {images}; {result['iterations']} timed iterations after "
             f"{result['warmup']} warm-up",
             f"{'runtime':<9}{'part':<12}{'median ms':>11}{'p90 ms':>10}{'images/s':>11}"]
    for name, parts in result["runtimes"].items():
        for part, s in parts.items():
            rate = "-" if s["images_per_s"] is None else f"{s['images_per_s']:.1f}"
            lines.append(f"{name:<9}{part:<12}{s['median_ms']:>11.2f}{s['p90_ms']:>10.2f}{rate:>11}")
    lines += [f"{name}: not measured ({why})" for name, why in result["skipped"].items()]
    return "\n".join(lines)
