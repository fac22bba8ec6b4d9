"""Twenty-sixth round. The map choice replayed with defects of other kinds (other_defects.py: blur, warp, noise) added
to its synthetic set: for each candidate map, AUPRO on the held-out pasted defects (today's set, auto.choice_set), on
the other kinds pasted on the same held-out normals, and on both; and test AUPRO / pixel AUROC on ROW and ROW_other.
    PYTHONPATH=src .venv/bin/python bench/results/r26/kinds_choice.py RUN_DIR ROW OUT.json
"""
import json, sys
import numpy as np
sys.path.insert(0, "bench"); sys.path.insert(0, "bench/results/r26")
from fastflow.auto import MARGIN, _held_out_images, _resize_bool, choice_set, level_maps, map_candidates, weighted_map
from fastflow.config import get_preset
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import pixel_aupro, pixel_auroc
from fastflow.run import preprocess_for
from fusion import load_held_out
from other_defects import KINDS, WORK, visible_defect

run, row, out = sys.argv[1:4]
model, ckpt, info, tcfg, val = load_held_out(run)
normals, pasted, pmasks = choice_set(val, tcfg.seed, model)
pre, (h, w) = preprocess_for(model), model.config.input_size
raw = _held_out_images(val)
other, omasks = [], []
rng = np.random.default_rng((tcfg.seed, 99))
per = max(1, len(pasted) // max(1, len(raw)) // len(KINDS))  # about as many as the pasted ones
for im in raw:
    for k in KINDS:
        for _ in range(per):
            bad, mask = visible_defect(im, rng, k)
            other.append(pre(bad)); omasks.append(_resize_bool(mask, (w, h)))
maps = level_maps(model, normals + pasted + other)
n, p = len(normals), len(pasted)
z = [np.zeros((h, w), bool)] * n
truth_p, truth_o = np.stack(z + list(pmasks)), np.stack(z + list(omasks))
truth_b = np.stack(z + list(pmasks) + list(omasks))
sel_p, sel_o = np.r_[0:n + p], np.r_[0:n, n + p:len(maps)]
tests = {}
for r in (row, f"{row}_other"):
    ds = AnomalyDataset(load_samples("mvtec", str(WORK / "data"), r, "test"), Preprocess.from_dict(ckpt["preprocess"]))
    items = [ds[i] for i in range(len(ds))]
    tests[r] = (level_maps(model, [it["image"] for it in items]), np.stack([it["mask"].numpy()[0] > 0.5 for it in items]))
pm = get_preset(info["preset"]).model
ids = list(model.level_ids)
map_levels = pm.map_levels or pm.levels or ids
current = tuple(1.0 if i in map_levels else 0.0 for i in ids)
res = {"run": run, "n_normal": n, "n_pasted": p, "n_other": len(other), "maps": {}}
for c in dict.fromkeys(map_candidates(model) + [current]):
    r = {"pasted": pixel_aupro(weighted_map(maps[sel_p], c), truth_p), "other": pixel_aupro(weighted_map(maps[sel_o], c), truth_o),
         "both": pixel_aupro(weighted_map(maps, c), truth_b)}
    for t, (tm, tt) in tests.items():
        r[t] = [pixel_auroc(weighted_map(tm, c), tt), pixel_aupro(weighted_map(tm, c), tt)]
    res["maps"][":".join(f"{v:g}" for v in c)] = r
    print(":".join(f"{v:g}" for v in c), {k: np.round(v, 4).tolist() for k, v in r.items()}, flush=True)
cur = ":".join(f"{v:g}" for v in current)
for crit in ("pasted", "both"):
    best = max(res["maps"], key=lambda k: res["maps"][k][crit])
    res[f"chosen_{crit}"] = best if res["maps"][best][crit] > res["maps"][cur][crit] + MARGIN else cur
    print(crit, "->", res[f"chosen_{crit}"], flush=True)
json.dump(res, open(out, "w"), indent=1)
