"""Twenty-fourth round. Candidate maps x blur sigmas: held-out synthetic AUPRO (the training's choice_set) and test figures, per run."""
import json, sys
from dataclasses import replace
import numpy as np
from fastflow.auto import level_maps, map_candidates, weighted_map
from fastflow.metrics import pixel_aupro, pixel_auroc
from common import run_sets  # beside this script

run, fmt, root, cat, out = sys.argv[1:6]
model, synthetic, truth, timgs, tmask = run_sets(run, fmt, root, cat)
base = model.config.smoothing_sigma
res = {"run": run, "sigma_preset": base, "maps": {}}
for sigma in [4.0, 8.0, 12.0, 16.0]:
    model.config = replace(model.config, smoothing_sigma=sigma)
    syn, test = level_maps(model, synthetic), level_maps(model, timgs)
    for c in map_candidates(model):
        name = f"{sigma:g}|" + ":".join(f"{x:g}" for x in c)
        r = {"syn": pixel_aupro(weighted_map(syn, c), truth), "test_aupro": pixel_aupro(weighted_map(test, c), tmask),
             "test_pix": pixel_auroc(weighted_map(test, c), tmask)}
        res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
        print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
