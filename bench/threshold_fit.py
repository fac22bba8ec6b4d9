"""Offline look at the decision threshold when the held-out normals are fewer than a 1% rate needs.

    .venv/bin/python bench/threshold_fit.py --runs /tmp/fastflow-suite/runs --out bench/results/threshold_fit.json

For each run of bench/suite.py (``GROUP_seedN``, ``--seeds``), scores its held-out normal images (the split
``fastflow train`` made) and its test split with ``Predictor``, and compares thresholds at a 1%
false-alarm rate: the largest held-out score (training's rule below 100 held-out images until the twelfth
round), a normal fit of the held-out scores (mean + z_0.99 sd), a log-normal one, and ``product``: what
``calibrate.threshold_from_scores`` gives today (the normal prediction bound below 100 images). Prints,
per run, each threshold's share of good test images flagged and of defective ones detected; ``--out``
also keeps every score.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from scipy.stats import norm

from fastflow import Predictor
from fastflow.calibrate import threshold_from_scores
from fastflow.data import load_samples
from fastflow.train import split_validation

GROUPS = ("bottle", "mtd", "brick", "grass", "moon", "posed", "wide")
SYNTH = {"bottle": "bottle_synth", "mtd": "mtd_synth"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", required=True, help="bench/suite.py's runs folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    z, out = norm.ppf(0.99), {}
    for group, seed in [(g, s) for g in GROUPS for s in a.seeds]:
        run = os.path.join(a.runs, f"{group}_seed{seed}")
        if not os.path.isdir(run):
            continue
        rj = json.load(open(os.path.join(run, "run.json")))
        d, tc = rj["data"], rj["train_config"]
        p = Predictor.from_run(run)
        train = load_samples(d["format"], d["root"], d["category"], "train", **d["options"])
        _, val = split_validation(train, tc["val_fraction"], tc["seed"], tc.get("val_min", 0))  # 0: runs before it
        vs = np.array([r.score for r in p.predict([s.path for s in val], batch_size=16)])
        log = np.log(np.clip(vs, 1e-12, None))
        thresholds = {"max": vs.max(), "normal": vs.mean() + z * vs.std(ddof=1),
                      "lognormal": np.exp(log.mean() + z * log.std(ddof=1)),
                      "product": threshold_from_scores(vs, tc["false_alarm_rate"], "held-out")["value"]}
        rows = [(group, d["format"], d["root"], d["category"], d["options"])]
        synth = os.path.join(os.path.dirname(os.path.abspath(a.runs)), "data", SYNTH.get(group, "-"))
        if os.path.isdir(synth):  # bottle_synth / mtd_synth: suite.py's data folder beside its runs
            rows.append((SYNTH[group], "mvtec", os.path.dirname(synth), SYNTH[group], {}))
        for row, fmt, root, category, options in rows:
            test = load_samples(fmt, root, category, "test", **options)
            ts = np.array([r.score for r in p.predict([s.path for s in test], batch_size=16)])
            labels = np.array([s.label for s in test])
            res = {"n_val": len(vs)}
            for k, t in thresholds.items():
                res[k] = {"threshold": round(float(t), 4),
                          "good_flagged": round(float((ts[labels == 0] > t).mean()), 3),
                          "detected": round(float((ts[labels == 1] > t).mean()), 3)}
            res["val_scores"] = [round(float(v), 5) for v in vs]
            res["test_scores"] = [round(float(v), 5) for v in ts]
            res["test_labels"] = [int(v) for v in labels]
            out[f"{row}_seed{seed}"] = res
            print(row, seed, json.dumps({k: v for k, v in res.items() if not k.startswith(("val_", "test_"))}),
                  flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
