"""Offline look at the decision threshold when the held-out normals are fewer than a 1% rate needs.

    .venv/bin/python bench/threshold_fit.py --runs /tmp/fastflow-suite/runs --out bench/results/threshold_fit.json

For each seed-0 run of bench/suite.py (``GROUP_seed0``), scores its held-out normal images (the split
``fastflow train`` made) and its test split with ``Predictor``, and compares three thresholds at a 1%
false-alarm rate: the largest held-out score (what training uses below 100 held-out images), a normal
fit of the held-out scores (mean + z_0.99 sd) and a log-normal one. Prints, per run, each threshold's
share of good test images flagged and of defective ones detected. An experiment, not the product path.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from scipy.stats import norm

from fastflow import Predictor
from fastflow.data import load_samples
from fastflow.train import split_validation

GROUPS = ("bottle", "mtd", "brick", "grass", "moon")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="bench/suite.py's runs folder")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    z, out = norm.ppf(0.99), {}
    for group in GROUPS:
        run = os.path.join(a.runs, f"{group}_seed0")
        if not os.path.isdir(run):
            continue
        rj = json.load(open(os.path.join(run, "run.json")))
        d, tc = rj["data"], rj["train_config"]
        p = Predictor.from_run(run)
        train = load_samples(d["format"], d["root"], d["category"], "train", **d["options"])
        _, val = split_validation(train, tc["val_fraction"], tc["seed"])
        vs = np.array([r.score for r in p.predict([s.path for s in val], batch_size=16)])
        test = load_samples(d["format"], d["root"], d["category"], "test", **d["options"])
        ts = np.array([r.score for r in p.predict([s.path for s in test], batch_size=16)])
        labels = np.array([s.label for s in test])
        log = np.log(np.clip(vs, 1e-12, None))
        thresholds = {"max": vs.max(), "normal": vs.mean() + z * vs.std(ddof=1),
                      "lognormal": np.exp(log.mean() + z * log.std(ddof=1))}
        res = {"n_val": len(vs)}
        for k, t in thresholds.items():
            res[k] = {"threshold": round(float(t), 4), "good_flagged": round(float((ts[labels == 0] > t).mean()), 3),
                      "detected": round(float((ts[labels == 1] > t).mean()), 3)}
        out[group] = res
        print(group, json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
