"""Twenty-fifth round. The map choice's candidates with and without a border correction (each map minus the held-out
normals' mean map at each distance from the image border): held-out synthetic AUPRO and pixel AUROC (the training's
choice_set) and test figures, per run.

    PYTHONPATH=src .venv/bin/python bench/results/r25/ring.py RUN_DIR FORMAT ROOT CATEGORY OUT.json
"""
import json, sys
import numpy as np
sys.path.insert(0, "bench/results/r24")
from fastflow.auto import level_maps, map_candidates, weighted_map
from fastflow.metrics import pixel_aupro, pixel_auroc
from common import run_sets

run, fmt, root, cat, out = sys.argv[1:6]
model, synthetic, truth, timgs, tmask = run_sets(run, fmt, root, cat)
n_normal = int((truth.reshape(len(truth), -1).sum(1) == 0).sum())  # the held-out normals come first
syn, test = level_maps(model, synthetic), level_maps(model, timgs)
h, w = syn.shape[2:]
y, x = np.mgrid[:h, :w]
ring = np.minimum(np.minimum(y, h - 1 - y), np.minimum(x, w - 1 - x))
res = {"run": run, "n_normal": n_normal, "maps": {}}
cands = [tuple(v / max(c) for v in c) for c in map_candidates(model)]
mw = dict(zip(model.map_index, model.map_weights or [1.0] * len(model.map_index)))
now = tuple(float(mw.get(i, 0.0)) for i in range(syn.shape[1]))
now = tuple(v / max(now) for v in now)
if tuple(now) not in cands:
    cands.append(tuple(now))
for wv in cands:
    sm, tm = weighted_map(syn, wv), weighted_map(test, wv)
    ring_mean = np.bincount(ring.ravel(), sm[:n_normal].mean(0).ravel()) / np.bincount(ring.ravel())
    for corr, off in (("", 0.0), ("+ring", ring_mean[ring])):
        a, b = sm - off, tm - off
        r = {"syn": pixel_aupro(a, truth), "syn_pix": pixel_auroc(a, truth),
             "test_aupro": pixel_aupro(b, tmask), "test_pix": pixel_auroc(b, tmask)}
        name = ":".join(f"{v:g}" for v in wv) + corr
        res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
        print(name, res["maps"][name], flush=True)
res["now"] = ":".join(f"{v:g}" for v in now)
json.dump(res, open(out, "w"), indent=1)
