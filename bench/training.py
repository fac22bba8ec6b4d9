"""Training wall time on MVTec AD bottle: ours with and without cached features vs anomalib, one run.

    .venv/bin/python bench/training.py [--epochs 3] [--peer-epochs 2] [--threads 2]

In one run, one after another (each in a fresh process, so peak memory is its own):
  1. ours, ``fastflow.train.train`` with the efficientnet_lite0 preset (its TrainConfig: batch 8,
     Adam 1e-3, 10% of the normals held out for validation and threshold), ``cache_features=True``:
     backbone features of every image computed once, then ``--epochs`` epochs on them;
  2. anomalib 2.7.0 (bench/peer/anomalib_fastflow.py --train-epochs ``--peer-epochs``, its own
     Folder datamodule + Engine, batch 32, decoding every PNG every epoch); its ``train_epoch_s`` is
     the last epoch;
  3. ours with ``cache_features=False`` (backbone on freshly decoded images every epoch, as anomalib);
  4. ours cached again at batch 32 (anomalib's batch size; ``--no-b32`` skips).
For ours: per-epoch seconds (history.json; excludes the validation pass and the checkpoint save,
as anomalib's epoch timer does), the feature-extraction time, wall time to a finished model (model
build, features, epochs, validation, threshold, saving) and the child's peak RSS (ru_maxrss).
Every step records the CPU seconds that other processes used and the load average.
Writes bench/results/training.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

TARGET_SPEEDUP = 5.0
TARGET_RSS_MB = 4096


def one(cache: bool, epochs: int, threads: int, batch: int | None) -> dict:
    """Child process: one training run; prints a JSON line."""
    import torch

    from fastflow.config import get_preset
    from fastflow.data.layouts import mvtec_samples
    from fastflow.train import train

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    preset = get_preset("efficientnet_lite0")
    tcfg = replace(preset.train, epochs=epochs, cache_features=cache, **({"batch_size": batch} if batch else {}))
    samples = mvtec_samples(C.DATA, "bottle", "train")
    with tempfile.TemporaryDirectory(prefix="ffbench-train-") as run_dir:
        res = train(preset.model, tcfg, samples, run_dir, weights="pretrained", progress=False, log=lambda *a: None)
        with open(os.path.join(run_dir, "history.json")) as f:
            hist = json.load(f)
    total = time.perf_counter() - t0
    epochs_s = [round(r["seconds"], 2) for r in hist["history"]]
    return {"cache_features": cache, "batch_size": tcfg.batch_size, "epochs": epochs, "images": len(samples),
            "fit_images": len(samples) - round(tcfg.val_fraction * len(samples)),
            "epoch_s": epochs_s, "epoch_s_last": epochs_s[-1], "epoch_s_mean": round(sum(epochs_s) / len(epochs_s), 2),
            "feature_cache_s": round(hist["feature_cache_seconds"], 2), "train_seconds": round(hist["train_seconds"], 2),
            "wall_to_finished_model_s": round(total, 2),
            "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "threads": torch.get_num_threads()}


def run_ours(cache: bool, epochs: int, threads: int, batch: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", "cache" if cache else "nocache",
           "--epochs", str(epochs), "--threads", str(threads)] + (["--batch", str(batch)] if batch else [])
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=C.REPO)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = round(time.perf_counter() - t0, 2)  # + interpreter and torch import
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--peer-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-b32", action="store_true")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--one", choices=["cache", "nocache"], help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(C.RESULTS / "training.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one == "cache", args.epochs, args.threads, args.batch)))
        return

    import torch

    result = {"env": C.environment(args.threads), "other_processes_at_start": C.other_processes(),
              "load_avg_start": [round(v, 2) for v in os.getloadavg()]}
    steps = [("ours_cached", lambda: run_ours(True, args.epochs, args.threads))]
    if not args.no_peer:
        steps.append(("anomalib", lambda: C.run_peer_script(
            "--train-epochs", str(args.peer_epochs), "--wait-idle", "0", "--threads", str(args.threads),
            "--runs-b32", "2")))
    steps.append(("ours_uncached", lambda: run_ours(False, args.epochs, args.threads)))
    if not args.no_b32:
        steps.append(("ours_cached_b32", lambda: run_ours(True, args.epochs, args.threads, 32)))
    for name, fn in steps:
        print(f"{name} ...", file=sys.stderr, flush=True)
        with C.Load() as load:
            res = fn()
        res["load"] = load.summary()
        result[name] = res
        print(f"{name}: {json.dumps({k: v for k, v in res.items() if 'epoch' in k or 'load' in k})}",
              file=sys.stderr, flush=True)
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]

    if "anomalib" in result:
        peer_epoch = result["anomalib"]["train_epoch_s"]
        ratios = {}
        for k in ("ours_cached", "ours_uncached", "ours_cached_b32"):
            if k not in result:
                continue
            r = result[k]
            # same number of epochs: anomalib's n epochs vs ours (features once + n epochs)
            ours_n = r["feature_cache_s"] * (1 if r["cache_features"] else 0) + r["epoch_s_last"] * args.peer_epochs
            ratios[k] = {"epoch_speedup": round(peer_epoch / r["epoch_s_last"], 2),
                         f"{args.peer_epochs}_epochs_speedup_incl_features": round(peer_epoch * args.peer_epochs / ours_n, 2),
                         "500_epochs_speedup_incl_features": round(
                             peer_epoch * 500 / (r["feature_cache_s"] * r["cache_features"] + 500 * r["epoch_s_last"]), 2)}
            ratios[k]["meets_target"] = ratios[k]["epoch_speedup"] >= TARGET_SPEEDUP
        result["speedup_vs_anomalib"] = ratios
    result["peak_rss_meets_target"] = all(result[k]["peak_rss_MiB"] <= TARGET_RSS_MB for k in result
                                          if k.startswith("ours_"))
    C.write_json(args.output, result)
    print(markdown(result, args))
    del torch


def markdown(r: dict, args) -> str:
    lines = ["| run | batch | epoch (s, last) | per image (ms) | feature extraction (s) | "
             f"wall to finished model, {args.epochs} epochs (s) | peak RSS (MiB) | anomalib epoch / ours | others' CPU share |",
             "|---|---|---|---|---|---|---|---|---|"]
    sp = r.get("speedup_vs_anomalib", {})
    for k in ("ours_cached", "ours_uncached", "ours_cached_b32"):
        if k not in r:
            continue
        x = r[k]
        ratio = f"{sp[k]['epoch_speedup']:.1f}x" if k in sp else ""
        lines.append(f"| {k.replace('_', ' ')} | {x['batch_size']} | {x['epoch_s_last']:.1f} | "
                     f"{1000 * x['epoch_s_last'] / x['fit_images']:.0f} | "
                     f"{x['feature_cache_s']:.1f} | {x['wall_to_finished_model_s']:.1f} | {x['peak_rss_MiB']:.0f} | "
                     f"{ratio} | {x['load']['others_share']:.2f} |")
    if "anomalib" in r:
        a = r["anomalib"]
        lines.append(f"| anomalib 2.7.0 (epoch {len(a['train_epoch_times_s'])} of {len(a['train_epoch_times_s'])}) "
                     f"| 32 | {a['train_epoch_s']:.1f} | {1000 * a['train_epoch_s'] / a['train_images_per_epoch']:.0f} | "
                     f"(every epoch) | fit {a['train_fit_total_s']:.1f} | | 1 | {a['load']['others_share']:.2f} |")
    lines.append("")
    lines.append(f"Load average {r['load_avg_start']} -> {r['load_avg_end']}. Targets: epoch >= {TARGET_SPEEDUP:g}x "
                 f"faster than anomalib; peak RSS <= {TARGET_RSS_MB} MiB "
                 f"({'met' if r['peak_rss_meets_target'] else 'missed'}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
