"""Run-to-run variation of the default command on MVTec bottle: train + evaluate over several seeds.

    .venv/bin/python bench/seeds.py --seeds 0 1 2 --out bench/results/seeds_default.json
    .venv/bin/python bench/seeds.py --seeds 0 1 2 --out bench/results/seeds_x.json -- --kernels 3-1

Everything after ``--`` is passed to ``fastflow train`` unchanged, so the same script measures the
preset as shipped and any variant of it. Each seed is a full ``fastflow train`` (feature caching,
validation hold-out, best-epoch selection, threshold) followed by ``fastflow evaluate``: the numbers are
what a user gets, and the test split steers nothing. Prints one line per seed and the mean / std.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from fastflow.cli import main as fastflow

KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")


def main() -> int:
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mvtec_ad"))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--format", default="mvtec")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--keep", default=None, help="keep the run folders under this folder (default: temporary)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fastflow-seeds-") as tmp:
        tmp = a.keep or tmp
        for seed in a.seeds:
            run_dir = os.path.join(tmp, f"seed{seed}")
            t0 = time.perf_counter()
            rc = fastflow(["train", "--data", a.data, "--category", a.category, "--format", a.format,
                           "--seed", str(seed), "--output", run_dir, "--quiet", *extra])
            train_s = time.perf_counter() - t0
            if rc != 0:
                raise SystemExit(f"seed {seed}: fastflow train exited with {rc}")
            metrics_path = os.path.join(run_dir, "metrics.json")
            rc = fastflow(["evaluate", run_dir, "--data", a.data, "--category", a.category, "--format", a.format,
                           "--output", metrics_path, "--quiet"])
            if rc != 0:
                raise SystemExit(f"seed {seed}: fastflow evaluate exited with {rc}")
            with open(metrics_path) as f:
                m = json.load(f)
            m = m.get(a.category, m)
            with open(os.path.join(run_dir, "history.json")) as f:
                hist = json.load(f)
            row = {"seed": seed, **{k: m[k] for k in KEYS if k in m}, "train_wall_s": round(train_s, 1),
                   "best_epoch": hist.get("best_epoch")}
            runs.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for k in KEYS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        if vals:
            summary[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          "min": min(vals), "max": max(vals)}
    result = {"train_args": extra, "category": a.category, "seeds": a.seeds, "runs": runs, "summary": summary,
              "torch": torch.__version__, "threads": a.threads,
              "load_avg": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    for k, v in summary.items():
        print(f"{k:14s} {v['mean']:.4f} +- {v['std']:.4f}  (min {v['min']:.4f}, max {v['max']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
