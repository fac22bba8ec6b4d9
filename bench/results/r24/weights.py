"""Twenty-fourth round. Weighted level maps: held-out synthetic AUPRO (the training's choice_set) and test figures, per run.

    PYTHONPATH=src .venv/bin/python bench/results/r24/weights.py RUN_DIR FORMAT ROOT CATEGORY OUT.json
"""
import itertools, json, sys
import numpy as np
from fastflow.auto import level_maps, _strides
from fastflow.metrics import pixel_aupro, pixel_auroc
from common import run_sets  # beside this script

run, fmt, root, cat, out = sys.argv[1:6]
model, synthetic, truth, timgs, tmask = run_sets(run, fmt, root, cat)
syn, test = level_maps(model, synthetic), level_maps(model, timgs)
strides = _strides(model)
order = sorted(range(len(strides)), key=strides.__getitem__)
L = len(strides)
res = {"run": run, "strides": strides, "map_now": list(model.map_index), "maps": {}}
cands = set()
for ws in itertools.product([0, 1, 2, 3], repeat=L - 1):
    wv = (1,) + ws  # finest weight 1 (finest-first order)
    cands.add(wv)
cands.add((0,) * (L - 1) + (1,))
for k in range(1, L + 1):  # finest-first subsets
    cands.add(tuple([1] * k + [0] * (L - k)))
for wv in sorted(cands):
    wt = np.zeros(L)
    for j, i in enumerate(order):
        wt[i] = wv[j]
    wt = wt / wt.sum()
    sm = np.tensordot(syn, wt, axes=([1], [0])); tm = np.tensordot(test, wt, axes=([1], [0]))
    name = ":".join(map(str, wv))
    r = {"syn": pixel_aupro(sm, truth), "test_aupro": pixel_aupro(tm, tmask), "test_pix": pixel_auroc(tm, tmask)}
    res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
    print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
