"""Twenty-ninth round: the map choice (auto.choose_map) replayed on a trained run, with its candidates' figures on
both sides: held-out synthetic AUPRO and pixel AUROC on the very set training builds (auto.choice_set with the run's
seed), and test AUPRO and pixel AUROC on the run's test row. Offline, so that other choice rules can be compared
without training again. Each candidate is also scored with the border correction the choice may add
(auto.border_offsets from the held-out normals' maps of that candidate). Usage (repository root):
    PYTHONPATH=src python bench/results/r29/map_replay.py OUT.json RUN_DIR FORMAT ROOT CATEGORY
"""
import json, sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from fusion import load_held_out  # noqa: E402

from fastflow.auto import (_map_name, _strides, border_offsets, choice_set, level_maps, map_candidates,  # noqa: E402
                           weighted_map)
from fastflow.model import border_matrix  # noqa: E402
from fastflow.config import get_preset  # noqa: E402
from fastflow.data import AnomalyDataset, Preprocess, load_samples  # noqa: E402
from fastflow.metrics import pixel_aupro, pixel_auroc  # noqa: E402

out_path, run, fmt, root, cat = sys.argv[1:6]
model, ckpt, info, tcfg, val = load_held_out(run)
preset = get_preset(info["preset"]).model
ids = model.level_ids
weights = dict(zip(preset.map_levels or ids, preset.map_weights or [1.0] * len(preset.map_levels or ids)))
current = tuple(float(weights.get(i, 0.0)) for i in ids)
candidates = list(dict.fromkeys(map_candidates(model) + [current]))
normals, defective, masks = choice_set(val, tcfg.seed, model)
h, w = model.config.input_size
syn = level_maps(model, normals + defective)
syn_truth = np.stack([np.zeros((h, w), dtype=bool)] * len(normals) + list(masks))
ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
items = [ds[i] for i in range(len(ds))]
test = level_maps(model, [it["image"] for it in items])
test_truth = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
rows = {}
for c in candidates:
    s, t = weighted_map(syn, c), weighted_map(test, c)
    ring = np.asarray(border_matrix((h, w), (h, w), border_offsets(s[:len(normals)])))

    def figs(s, t):
        return {"syn_aupro": round(float(pixel_aupro(s, syn_truth)), 4),
                "syn_pixel_auroc": round(float(pixel_auroc(s, syn_truth)), 4),
                "test_aupro": round(float(pixel_aupro(t, test_truth)), 4),
                "test_pixel_auroc": round(float(pixel_auroc(t, test_truth)), 4)}
    rows[_map_name(c, _strides(model))] = {"preset": c == current, **figs(s, t), "border": figs(s - ring, t - ring)}
    print(run, _map_name(c, _strides(model)), rows[_map_name(c, _strides(model))], flush=True)
result = {"run": run, "row": cat, "preset": info["preset"], "n_val": len(val), "n_syn": len(defective),
          "chosen_in_run": (ckpt.get("map_choice") or {}).get("chosen"), "candidates": rows}
json.dump(result, open(out_path, "w"), indent=1)
