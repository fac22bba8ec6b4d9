"""int8 vs float32 ONNX on MVTec bottle: accuracy (image and pixel AUROC) and throughput at batch 32, one run.

    .venv/bin/python bench/int8.py --run RUN_DIR [--data ../shared/data/mvtec_ad] [--category bottle]
        [--calibration DIR] [--calibration-images 64] [--batch 32] [--runs 5] [--threads 2] [--limit N]
        [--scope deep|all|backbone] [--method minmax|percentile|entropy] [--output bench/results/int8.json]

RUN_DIR: a trained run of the category (``fastflow train ... --output RUN_DIR``). Both models are
exported fresh into a temporary folder with fastflow's own code: float32 (``fastflow export``) and int8
(``fastflow export --quantize int8 --calibration DIR``; DIR defaults to the category's train/good).
Accuracy: every test image (or ``--limit`` of them, evenly spaced) preprocessed as ``Predictor`` does,
scored by both graphs, metrics from fastflow.metrics (pixel metrics at the input resolution, as
``fastflow evaluate``). Throughput: one batch of ``--batch`` real test images through each session
(``Predictor.from_onnx``: intra-op threads ``--threads``, no spinning), ``--runs`` timed calls each,
alternating fp32 / int8 blocks so that load from other processes hits both alike; images/s from the
median call. Goals (issue 20): image AUROC equal, pixel AUROC within 0.003, int8 >= 1.8x fp32.
Prints one JSON object (also written to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mvtec_ad"


def score_all(infer, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    scores, maps = [], []
    for i in range(0, len(images), batch):
        s, m = infer(images[i:i + batch])
        scores.append(s)
        maps.append(m[:, 0])
    return np.concatenate(scores), np.concatenate(maps)


def throughput(infers: dict, batch: np.ndarray, runs: int, blocks: int = 3) -> dict[str, float]:
    for infer in infers.values():
        infer(batch)  # warm-up
    times = {name: [] for name in infers}
    for b in range(blocks):
        for name, infer in infers.items():
            for _ in range(max(1, runs // blocks) if b < blocks - 1 else max(1, runs - (blocks - 1) * (runs // blocks))):
                t0 = time.perf_counter()
                infer(batch)
                times[name].append(time.perf_counter() - t0)
    return {name: len(batch) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    sys.path.insert(0, str(REPO / "src"))
    from fastflow.data import AnomalyDataset, load_samples
    from fastflow.export import export_onnx
    from fastflow.metrics import evaluate_arrays
    from fastflow.predict import Predictor
    from fastflow.quantize import DEFAULT_SCOPE, METHODS, SCOPES, quantize_onnx

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a trained run of --category")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--calibration", default=None, help="normal images (default: DATA/CATEGORY/train/good)")
    ap.add_argument("--calibration-images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="test images used (evenly spaced; default all)")
    ap.add_argument("--scope", choices=list(SCOPES), default=DEFAULT_SCOPE, help="which convolutions are quantised")
    ap.add_argument("--method", choices=list(METHODS), default="minmax", help="activation range calibration")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    calibration = args.calibration or os.path.join(args.data, args.category, "train", "good")
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        fp32_path, int8_path = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "model-int8.onnx")
        t0 = time.perf_counter()
        export_onnx(args.run, fp32_path)
        t1 = time.perf_counter()
        meta = quantize_onnx(fp32_path, calibration, int8_path, args.calibration_images, args.scope, True, args.method)
        t2 = time.perf_counter()
        fp32 = Predictor.from_onnx(fp32_path, num_threads=args.threads)
        int8 = Predictor.from_onnx(int8_path, num_threads=args.threads)

        samples = load_samples("mvtec", args.data, args.category, "test")
        if args.limit and args.limit < len(samples):
            samples = [samples[i] for i in np.linspace(0, len(samples) - 1, args.limit).round().astype(int)]
        dataset = AnomalyDataset(samples, fp32.preprocess, cache=False)
        items = [dataset[i] for i in range(len(dataset))]
        images = np.stack([it["image"].numpy() for it in items]).astype(np.float32)
        labels = np.array([it["label"] for it in items])
        masks = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
        has_mask = np.array([bool(it["has_mask"]) for it in items])

        metrics = {}
        for name, pred in (("fp32", fp32), ("int8", int8)):
            scores, maps = score_all(pred.infer, images, args.batch)
            m = evaluate_arrays(scores, labels, maps, masks, has_mask)
            metrics[name] = {k: m[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")}
            metrics[name]["scores"] = scores
        corr = float(np.corrcoef(metrics["fp32"].pop("scores"), metrics["int8"].pop("scores"))[0, 1])

        reps = int(np.ceil(args.batch / len(images)))
        batch = np.concatenate([images] * reps)[:args.batch]
        speed = throughput({"fp32": fp32.infer, "int8": int8.infer}, batch, args.runs)

    d_img = metrics["int8"]["image_auroc"] - metrics["fp32"]["image_auroc"]
    d_pix = (None if metrics["fp32"]["pixel_auroc"] is None else
             metrics["int8"]["pixel_auroc"] - metrics["fp32"]["pixel_auroc"])
    ratio = speed["int8"] / speed["fp32"]
    result = {
        "run": os.path.abspath(args.run), "category": args.category, "test_images": len(images),
        "threads": args.threads, "batch": args.batch, "runs": args.runs, "scope": args.scope, "method": args.method,
        "calibration": meta["quantization"]["calibration"], "quantized": meta["quantization"]["quantized"],
        "export_s": round(t1 - t0, 1), "quantize_s": round(t2 - t1, 1),
        "fp32": metrics["fp32"], "int8": metrics["int8"], "score_pearson": corr,
        "image_auroc_diff": d_img, "pixel_auroc_diff": d_pix,
        "throughput_img_s": {k: round(v, 2) for k, v in speed.items()}, "speedup": round(ratio, 3),
        "goals": {"image_auroc_equal": abs(d_img) < 1e-9, "pixel_auroc_within_0.003": d_pix is not None and
                  abs(d_pix) <= 0.003, "speedup_at_least_1.8": ratio >= 1.8},
        "load_average": os.getloadavg(),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
