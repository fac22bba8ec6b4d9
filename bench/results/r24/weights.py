"""Twenty-fourth round. Weighted level maps: held-out synthetic AUPRO (the training's choice_set) and test figures, per run.

    PYTHONPATH=src .venv/bin/python bench/results/r24/weights.py RUN_DIR FORMAT ROOT CATEGORY OUT.json
"""
import itertools, json, sys
import numpy as np, torch
sys.path.insert(0, "bench")
from fastflow.auto import choice_set, level_maps, _strides
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import pixel_aupro, pixel_auroc
from fusion import load_held_out

run, fmt, root, cat, out = sys.argv[1:6]
torch.set_num_threads(2)
model, ckpt, _, tcfg, val = load_held_out(run)
normals, defective, masks = choice_set(val, tcfg.seed, model)
syn = level_maps(model, normals + defective)
h, w = model.config.input_size
truth = np.stack([np.zeros((h, w), bool)] * len(normals) + list(masks))
ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
items = [ds[i] for i in range(len(ds))]
test = level_maps(model, [it["image"] for it in items])
tmask = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
strides = _strides(model)
order = sorted(range(len(strides)), key=strides.__getitem__)
L = len(strides)
grid = [1, 2, 3] if L == 2 else [0, 1, 2, 3]
res = {"run": run, "strides": strides, "map_now": list(model.map_index), "maps": {}}
cands = set()
for ws in itertools.product([0, 1, 2, 3], repeat=L - 1):
    wv = (1,) + ws  # finest weight 1 (finest-first order)
    cands.add(wv)
cands.add((0,) * (L - 1) + (1,))
for k in range(1, L + 1):  # finest-first subsets
    cands.add(tuple([1] * k + [0] * (L - k)))
for wv in sorted(cands):
    wt = np.zeros(L); 
    for j, i in enumerate(order): wt[i] = wv[j]
    wt = wt / wt.sum()
    sm = np.tensordot(syn, wt, axes=([1], [0])); tm = np.tensordot(test, wt, axes=([1], [0]))
    name = ":".join(map(str, wv))
    r = {"syn": pixel_aupro(sm, truth), "test_aupro": pixel_aupro(tm, tmask), "test_pix": pixel_auroc(tm, tmask)}
    res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
    print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
