"""Accuracy of a trained run for several blur sigmas of the anomaly map (a post-processing choice).

    .venv/bin/python bench/sigma.py RUN_DIR --data ../shared/data/mvtec_ad --category bottle --sigmas 0 4 6 8

Loads the run's model, changes only ``smoothing_sigma`` and evaluates the test split each time; the
threshold and the flows are untouched. Prints one JSON line per sigma (image AUROC, pixel AUROC, AUPRO).
"""

from __future__ import annotations

import argparse
import json

import torch

from fastflow.config import replace
from fastflow.data import Preprocess, load_samples
from fastflow.evaluate import evaluate_model
from fastflow.run import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--data", required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--format", default="mvtec")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0, 2, 4, 6, 8, 10])
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, ckpt = load_run(a.run_dir)
    pre = Preprocess.from_dict(ckpt["preprocess"])
    samples = load_samples(a.format, a.data, a.category, "test")
    for sigma in a.sigmas:
        model.config = replace(model.config, smoothing_sigma=sigma)
        m, _ = evaluate_model(model, samples, pre)
        print(json.dumps({"sigma": sigma, **{k: round(m[k], 4) for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}}),
              flush=True)


if __name__ == "__main__":
    main()
