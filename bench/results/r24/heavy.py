"""Twenty-fourth round. The map choice's candidates with the second-finest level weighted 2-16x, per run."""
import json, sys
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
syn = level_maps(model, normals + defective)
h, w = model.config.input_size
truth = np.stack([np.zeros((h, w), bool)] * len(normals) + list(masks))
ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
items = [ds[i] for i in range(len(ds))]
test = level_maps(model, [it["image"] for it in items])
tmask = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
base = map_candidates(model)
two = [c for c in base if sum(1 for x in c if x) == 2 and max(c) == 1.0][0]  # the two finest, equal
lv = [i for i, x in enumerate(two) if x]
cands = list(base)
for k in (5.0, 8.0, 16.0):
    c = list(two); c[lv[1]] = k; cands.append(tuple(c))
# the second-finest alone, for reference
c = [0.0] * len(two); c[lv[1]] = 1.0; cands.append(tuple(c))
res = {"run": run, "maps": {}}
for c in cands:
    name = ":".join(f"{x:g}" for x in c)
    sm, tm = weighted_map(syn, c), weighted_map(test, c)
    r = {"syn": pixel_aupro(sm, truth), "test_aupro": pixel_aupro(tm, tmask), "test_pix": pixel_auroc(tm, tmask)}
    res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
    print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
