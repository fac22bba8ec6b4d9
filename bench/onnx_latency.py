"""CPU latency of ONNX Runtime vs torch for the default preset (efficientnet_lite0, 256x256).

    python bench/onnx_latency.py [--threads 2] [--runs 30] [--batch 32] [--batch-runs 5]

Both run the same network (random flow weights: speed does not depend on them) on 2 threads:
``torch.set_num_threads(2)`` and ONNX Runtime ``intra_op_num_threads=2``. Reported: batch 1 median
latency over ``--runs`` runs (after warm-up), and batch 32 throughput (median time of ``--batch-runs``
runs); the two runtimes are timed in alternating blocks. Graph only: no image decoding or resizing. Prints a JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch


def timed(fns: dict, runs: int, warmup: int = 3, blocks: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, measured in alternating blocks (a x n, b x n, a x n, ...) so
    that varying load from other processes on the machine hits both alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    per_block = max(1, runs // blocks)
    for b in range(blocks):
        for name, fn in fns.items():
            n = per_block if b < blocks - 1 else runs - per_block * (blocks - 1)
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    import onnxruntime as ort

    from fastflow.config import get_preset
    from fastflow.export import ScoreAndMap, _export, check_parity
    from fastflow.run import OUTPUT_NAMES
    from fastflow.model import FastFlow

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-runs", type=int, default=5)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset("efficientnet_lite0").model
    model = FastFlow(cfg, weights="pretrained").eval()
    h, w = cfg.input_size
    path = os.path.join(tempfile.mkdtemp(), "lite0.onnx")
    t0 = time.perf_counter()
    _export(ScoreAndMap(model), torch.randn(2, 3, h, w), path, 18, "torchscript")
    export_s = time.perf_counter() - t0
    parity = check_parity(path, model)

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    # No busy-waiting between runs: spinning ORT threads would steal the cores torch is timed on next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    x1 = np.random.default_rng(0).standard_normal((1, 3, h, w)).astype(np.float32)
    xb = np.random.default_rng(1).standard_normal((args.batch, 3, h, w)).astype(np.float32)

    def run_torch(x):
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
            return out.score.numpy(), out.anomaly_map.numpy()

    def run_ort(x):
        return session.run(list(OUTPUT_NAMES), {"image": x})

    result = {"preset": "efficientnet_lite0", "input_size": [h, w], "threads": args.threads,
              "torch": torch.__version__, "onnxruntime": ort.__version__, "export_seconds": round(export_s, 2),
              "parity_max_abs_diff_map": parity["max_abs_diff_map"], "load_avg_before": os.getloadavg()[0]}
    runners = {"torch": run_torch, "onnxruntime": run_ort}
    lat = timed({k: (lambda f=f: f(x1)) for k, f in runners.items()}, args.runs)
    big = timed({k: (lambda f=f: f(xb)) for k, f in runners.items()}, args.batch_runs, warmup=1, blocks=1)
    for name in runners:
        result[name] = {"batch1_median_ms": round(1000 * statistics.median(lat[name]), 2),
                        "batch1_p90_ms": round(1000 * float(np.percentile(lat[name], 90)), 2),
                        f"batch{args.batch}_images_per_s": round(args.batch / statistics.median(big[name]), 1)}
        print(name, result[name], flush=True)
    result["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
