"""Twenty-fourth round. Image-score candidates of a run with separate score levels: held-out synthetic and test image AUROC."""
import json, sys
from dataclasses import replace
import numpy as np, torch
sys.path.insert(0, "bench")
from fastflow.auto import choice_set, _outputs
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import image_auroc
from fusion import load_held_out

run, out = sys.argv[1], sys.argv[2]
rows = [r.split(":") for r in sys.argv[3:]]  # FORMAT:ROOT:CATEGORY
torch.set_num_threads(2)
model, ckpt, _, tcfg, val = load_held_out(run)
normals, defective, _ = choice_set(val, tcfg.seed, model)
size = tuple(model.config.input_size)
sidx, midx = list(model.score_index), list(model.map_index)

def latents(images):
    zs = []
    for frozen, o in _outputs(model, images):
        zs.append([(o.z[i].clone(), o.log_det_maps[i].clone()) for i in range(len(o.z))])
    return [[torch.cat([b[i][0] for b in zs]), torch.cat([b[i][1] for b in zs])] for i in range(len(zs[0]))]

def scores(lat):
    res = {}
    for sigma in (4.0, 8.0, 16.0):
        model.config = replace(model.config, smoothing_sigma=sigma)
        with torch.inference_mode():
            smap = model.anomaly_map([lat[i][0] for i in sidx], [lat[i][1] for i in sidx], size).flatten(1)
            mmap = model.anomaly_map([lat[i][0] for i in midx], [lat[i][1] for i in midx], size).flatten(1)
        res[f"score_max_s{sigma:g}"] = smap.amax(1).numpy()
        for q in (0.01, 0.05):
            k = max(1, int(q * smap.shape[1]))
            res[f"score_top{q:g}_s{sigma:g}"] = smap.topk(k, dim=1).values.mean(1).numpy()
        res[f"map_max_s{sigma:g}"] = mmap.amax(1).numpy()
    return res

syn = scores(latents(normals + defective))
labels = np.r_[np.zeros(len(normals)), np.ones(len(defective))]
result = {"syn": {k: image_auroc(v, labels) for k, v in syn.items()}}
for fmt, root, cat in rows:
    ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
    items = [ds[i] for i in range(len(ds))]
    sc = scores(latents([it["image"] for it in items]))
    lab = np.array([float(it["label"]) for it in items])
    result[cat] = {k: image_auroc(v, lab) for k, v in sc.items()}
for k in result["syn"]:
    print(f"{k:22s} " + "  ".join(f"{r}: {result[r][k]:.4f}" for r in result), flush=True)
json.dump({r: {k: float(v) for k, v in d.items()} for r, d in result.items()}, open(out, "w"), indent=1)
