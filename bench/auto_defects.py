"""How many pasted defects the automatic choice needs: its candidates' probes scored on 2 and on 4 defects per
held-out image (an experiment for small sets, where 10 held-out normals give the choice 20 defects).

    .venv/bin/python bench/auto_defects.py --data /tmp/fastflow-suite/data --categories brick,moon,grass,gravel_wide \\
        --seeds 0 1 2 --out bench/results/auto_defects.json

For each category and seed: the held-out split ``fastflow train`` makes, each candidate of ``auto.CANDIDATES``
trained as a probe exactly as ``auto.choose`` trains it (its preset, that seed), then scored by
``auto.synthetic_score`` on the synthetic set of each size (drawn as ``auto.synthetic_validation`` draws it).
Prints one JSON line per category and seed: the scores and the choice (``auto.pick``, as ``auto.choose``
makes it) at each size. The test split is never read.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace

import fastflow.auto as auto
from fastflow.config import get_preset
from fastflow.data import load_samples
from fastflow.run import load_run
from fastflow.train import split_validation, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="an MVTec-layout root")
    ap.add_argument("--categories", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2, 4], help="defects per held-out image")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = {}
    presets = {n: get_preset(n) for n in auto.CANDIDATES}
    first = presets[auto.CANDIDATES[0]].train
    for category in a.categories.split(","):
        samples = load_samples("mvtec", a.data, category, "train")
        for seed in a.seeds:
            _, val = split_validation(samples, first.val_fraction, seed, first.val_min)
            sets = {k: auto.synthetic_validation(val, seed, per_image=k) for k in a.sizes}
            scores = {k: {} for k in a.sizes}
            for name, preset in presets.items():
                probe = auto.probe_config(replace(preset.train, seed=seed), len(samples) - len(val))
                with tempfile.TemporaryDirectory() as tmp:
                    run = os.path.join(tmp, "probe")
                    train(preset.model, probe, samples, run, progress=False, log=lambda *x, **y: None)
                    model, _ = load_run(run)
                for k, (normals, defective, masks) in sets.items():
                    scores[k][name] = round(auto.synthetic_score(model, normals, defective, masks)["score"], 4)
            row = {"category": category, "seed": seed, "n_val": len(val),
                   **{f"per_image_{k}": {"scores": scores[k], "chosen": auto.pick(scores[k])} for k in a.sizes}}
            out[f"{category}_seed{seed}"] = row
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
