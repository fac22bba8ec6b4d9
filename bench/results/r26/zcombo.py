"""Twenty-sixth round. Image scores that add the flow's score and the (border-corrected) map's max, each
standardised by the held-out normal images' scores: held-out synthetic and test image AUROC.
Usage (repository root): python bench/results/r26/zcombo.py RUN OUT FORMAT:ROOT:CATEGORY ..."""
import json, sys
import numpy as np, torch
sys.path.insert(0, "bench")
from fastflow.auto import _scores_and_maps, choice_set, level_maps
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import image_auroc
from fusion import load_held_out

run, out = sys.argv[1], sys.argv[2]
rows = [r.split(":") for r in sys.argv[3:]]
torch.set_num_threads(2)
model, ckpt, _, tcfg, val = load_held_out(run)
COARSE = len(model.config.levels) - 1  # lite0_unaligned_fine's score level: the stride-32 flow
normals, defective, _ = choice_set(val, tcfg.seed, model)
WEIGHTS = (0.25, 0.5, 1.0, 2.0)


def raw(images):
    _, maps = _scores_and_maps(model, images)
    coarse = level_maps(model, images)[:, COARSE]
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)
    top = {f"map_top{q}": flat[:, -max(1, int(q * flat.shape[1])):].mean(1) for q in (0.001, 0.01)}
    rel = flat[:, -1] - np.median(flat, axis=1)  # the map's max above the image's own median
    return {**top, "map_rel": rel, "score": coarse.reshape(len(coarse), -1).max(-1), "map_max": maps.reshape(len(maps), -1).max(-1)}


syn = raw(normals + defective)
k = len(normals)
mu = {n: v[:k].mean() for n, v in syn.items()}
sd = {n: v[:k].std() + 1e-12 for n, v in syn.items()}


def combos(s):
    z = {n: (v - mu[n]) / sd[n] for n, v in s.items()}
    c = {"score": s["score"], "map_max": s["map_max"], "z_max": np.maximum(z["score"], z["map_max"]),
         **{n: v for n, v in s.items() if n.startswith("map_top")}}
    c["map_rel"] = s["map_rel"]
    for a in WEIGHTS:
        c[f"z_score+{a}map"] = z["score"] + a * z["map_max"]
        c[f"z_score+{a}rel"] = z["score"] + a * z["map_rel"]
    return c


labels = np.r_[np.zeros(k), np.ones(len(defective))]
result = {"syn": {n: image_auroc(v, labels) for n, v in combos(syn).items()}}
for fmt, root, cat in rows:
    ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
    items = [ds[i] for i in range(len(ds))]
    sc = combos(raw([it["image"] for it in items]))
    lab = np.array([float(it["label"]) for it in items])
    result[cat] = {n: image_auroc(v, lab) for n, v in sc.items()}
for n in result["syn"]:
    print(f"{n:18s} " + "  ".join(f"{r}: {result[r][n]:.4f}" for r in result), flush=True)
json.dump({r: {n: float(v) for n, v in d.items()} for r, d in result.items()}, open(out, "w"), indent=1)
