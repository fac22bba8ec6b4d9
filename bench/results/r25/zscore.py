"""Twenty-fifth round. Image scores that add standardised level scores: held-out synthetic and test image AUROC.
Usage (repository root): python bench/results/r25/zscore.py RUN OUT FORMAT:ROOT:CATEGORY ..."""
import json, sys
import numpy as np, torch
sys.path.insert(0, "bench")
from fastflow.auto import choice_set, level_maps
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import image_auroc
from fusion import load_held_out

run, out = sys.argv[1], sys.argv[2]
rows = [r.split(":") for r in sys.argv[3:]]
torch.set_num_threads(2)
model, ckpt, _, tcfg, val = load_held_out(run)
normals, defective, _ = choice_set(val, tcfg.seed, model)
sidx, midx = list(model.score_index), list(model.map_index)
w = np.asarray(model.map_weights if model.map_weights else [1.0] * len(midx), dtype=np.float32)
w = w / w.sum()


def raw(maps):  # maps (N, L, H, W) -> named (N,) raw scores
    n = len(maps)
    amap = np.tensordot(maps[:, midx], w, axes=([1], [0]))
    s = {"score": maps[:, sidx].mean(1).reshape(n, -1).max(-1), "map_max": amap.reshape(n, -1).max(-1)}
    for i in range(maps.shape[1]):
        s[f"level{i}"] = maps[:, i].reshape(n, -1).max(-1)
    return s


syn_maps = level_maps(model, normals + defective)
syn = raw(syn_maps)
k = len(normals)
mu = {name: v[:k].mean() for name, v in syn.items()}
sd = {name: v[:k].std() + 1e-12 for name, v in syn.items()}


def combos(s):
    z = {name: (v - mu[name]) / sd[name] for name, v in s.items()}
    levels = [z[f"level{i}"] for i in range(len(model.config.levels or [0, 1, 2]))]
    c = {"score": s["score"], "map_max": s["map_max"], "z_score+map": z["score"] + z["map_max"],
         "z_sum_levels": sum(levels), "z_max_levels": np.max(levels, axis=0)}
    for a in (0.25, 0.5):
        c[f"z_score+{a}map"] = z["score"] + a * z["map_max"]
    return c


labels = np.r_[np.zeros(k), np.ones(len(defective))]
result = {"syn": {n: image_auroc(v, labels) for n, v in combos(syn).items()}}
for fmt, root, cat in rows:
    ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
    items = [ds[i] for i in range(len(ds))]
    sc = combos(raw(level_maps(model, [it["image"] for it in items])))
    lab = np.array([float(it["label"]) for it in items])
    result[cat] = {n: image_auroc(v, lab) for n, v in sc.items()}
for n in result["syn"]:
    print(f"{n:18s} " + "  ".join(f"{r}: {result[r][n]:.4f}" for r in result), flush=True)
json.dump({r: {n: float(v) for n, v in d.items()} for r, d in result.items()}, open(out, "w"), indent=1)
