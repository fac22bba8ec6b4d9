"""Twenty-fourth round. Candidate maps x blur sigmas: held-out synthetic AUPRO (the training's choice_set) and test figures, per run."""
import json, sys
from dataclasses import replace
import numpy as np, torch
sys.path.insert(0, "bench")
from fastflow.auto import choice_set, level_maps, map_candidates, weighted_map
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import pixel_aupro, pixel_auroc
from fusion import load_held_out

run, fmt, root, cat, out = sys.argv[1:6]
torch.set_num_threads(2)
model, ckpt, _, tcfg, val = load_held_out(run)
normals, defective, masks = choice_set(val, tcfg.seed, model)
h, w = model.config.input_size
truth = np.stack([np.zeros((h, w), bool)] * len(normals) + list(masks))
ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
items = [ds[i] for i in range(len(ds))]
timgs = [it["image"] for it in items]
tmask = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
base = model.config.smoothing_sigma
res = {"run": run, "sigma_preset": base, "maps": {}}
for sigma in [4.0, 8.0, 12.0, 16.0]:
    model.config = replace(model.config, smoothing_sigma=sigma)
    syn = level_maps(model, normals + defective); test = level_maps(model, timgs)
    for c in map_candidates(model):
        name = f"{sigma:g}|" + ":".join(f"{x:g}" for x in c)
        r = {"syn": pixel_aupro(weighted_map(syn, c), truth), "test_aupro": pixel_aupro(weighted_map(test, c), tmask),
             "test_pix": pixel_auroc(weighted_map(test, c), tmask)}
        res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
        print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
