"""How a trained run's levels are combined into the map and the image score, measured after training.

    PYTHONPATH=src .venv/bin/python bench/fusion.py RUN_DIR --row FORMAT ROOT CATEGORY [--row ...] --out F.json \
        [--only 'model|maps_.*']      # a regular expression: only the rules it matches (AUPRO takes seconds each)

For every level of the run's model it computes that level's own map (upsampled and blurred as the model
does) on the run's held-out normal images (its validation split, reproduced from run.json), on synthetic
defects pasted onto them (auto.synthetic_validation, the automatic choice's set) and on each ``--row``'s
test split. Then it scores several ways of combining the levels:

  * ``model``: the run's own rule (map = mean of the map levels, score = max of the score levels' map);
  * ``z_mean``: each level's map standardised by its mean and spread on the held-out normals' pixels, then
    averaged over all levels; the score is the max of that map;
  * ``z_max``: the same, maximum over levels instead of the mean;
  * ``model_map+z_score``: the model's map; the score is the largest of the levels' image scores, each
    standardised by the held-out normals' image scores (mean and spread);
  * ``z_mean+z_score``: z_mean's map, the standardised score;
  * ``map_score``: the model's map, and its max as the score (all levels' roles as the map levels');
  * ``levelN``: one level alone, its map and its max;
  * ``maps_A+B``: the mean of those levels' maps (a subset of all levels; the model's image score);
  * ``gate_Q``: the model's map plus, for each level outside it, that level's map's excess over the held-out
    normals' pixel quantile Q (zero wherever it looks normal);
  * ``ring_sub`` / ``ring_z``: the model's map and score map with the held-out normals' mean at each distance
    from the image border subtracted (and divided by their spread at that distance): a border correction.
Image and pixel AUROC and AUPRO on the held-out synthetic defects and on every row. Only the held-out normal
images set the standardisation (no test image). One JSON object per run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re

import numpy as np
import torch

from fastflow.auto import level_maps, synthetic_validation
from fastflow.config import from_dict, TrainConfig
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.metrics import image_auroc, pixel_aupro, pixel_auroc
from fastflow.data.preprocess import _resize_bool
from fastflow.model import border_distance
from fastflow.run import load_run, preprocess_for
from fastflow.train import split_validation


def maps_of(model, tensors) -> np.ndarray:
    """(L, N, H, W): each level's own map of the preprocessed ``tensors`` at input size (auto.level_maps)."""
    return level_maps(model, tensors).transpose(1, 0, 2, 3)


def rules(model, normals: np.ndarray) -> dict:
    """rule name -> f(maps (L, N, H, W)) -> (map (N, H, W), score (N,))."""
    mu = normals.mean(axis=(1, 2, 3))[:, None, None, None]
    sd = normals.std(axis=(1, 2, 3))[:, None, None, None]
    s_n = normals.reshape(len(normals), normals.shape[1], -1).max(-1)  # (L, N) held-out image scores
    s_mu, s_sd = s_n.mean(1)[:, None], s_n.std(1)[:, None]
    mi, si = list(model.map_index), list(model.score_index)

    def model_score(m):  # the run's image score: the max of its score levels' mean map
        return m[si].mean(0).reshape(m.shape[1], -1).max(-1)

    def model_rule(m):
        return m[mi].mean(0), model_score(m)

    def z(m):
        return (m - mu) / sd

    def z_score(m):
        s = m.reshape(m.shape[0], m.shape[1], -1).max(-1)
        return ((s - s_mu) / s_sd).max(0)

    def level(i):
        return lambda m: (m[i], m[i].reshape(m.shape[1], -1).max(-1))

    def map_score(m):
        amap = m[mi].mean(0)
        return amap, amap.reshape(len(amap), -1).max(-1)

    ring = ring_index(*normals.shape[2:])

    def ring_stats(maps):  # per distance from the border: the held-out normals' mean and spread, as (H, W) maps
        mean = np.array([maps[:, ring == k].mean() for k in range(ring.max() + 1)])
        std = np.array([maps[:, ring == k].std() for k in range(ring.max() + 1)])
        return mean[ring], std[ring]

    (map_mu, map_sd), (score_mu, score_sd) = ring_stats(normals[mi].mean(0)), ring_stats(normals[si].mean(0))

    def ring_rule(standardise):
        def rule(m):
            amap, smap = m[mi].mean(0) - map_mu, m[si].mean(0) - score_mu
            if standardise:
                amap, smap = amap / map_sd, smap / score_sd
            return amap, smap.reshape(len(smap), -1).max(-1)
        return rule

    names = list(model.config.levels or range(len(normals)))

    def subset(idx):
        return lambda m: (m[list(idx)].mean(0), model_score(m))

    subsets = {"maps_" + "+".join(str(names[i]) for i in idx): subset(idx)
               for k in range(2, len(names) + 1) for idx in itertools.combinations(range(len(names)), k)
               if sorted(idx) != sorted(mi)}
    others = [i for i in range(len(names)) if i not in mi]

    def gate(q):  # the map plus each other level's excess over its held-out normals' pixel quantile q
        t = [np.quantile(normals[i], q) for i in others]
        return lambda m: (m[mi].mean(0) + sum(np.maximum(m[i] - ti, 0) for i, ti in zip(others, t)),
                          model_score(m))

    gates = {f"gate_{q}": gate(q) for q in (0.99, 0.999, 1.0)} if others else {}
    return {
        "model": model_rule,
        **gates,
        **subsets,
        "ring_sub": ring_rule(False),
        "ring_z": ring_rule(True),
        "map_score": map_score,
        **{f"level{lv}": level(i) for i, lv in enumerate(model.config.levels or range(len(normals)))},
        "z_mean": lambda m: (lambda a: (a, a.reshape(len(a), -1).max(-1)))(z(m).mean(0)),
        "z_max": lambda m: (lambda a: (a, a.reshape(len(a), -1).max(-1)))(z(m).max(0)),
        "model_map+z_score": lambda m: (model_rule(m)[0], z_score(m)),
        "z_mean+z_score": lambda m: (z(m).mean(0), z_score(m)),
    }


def ring_index(h: int, w: int) -> np.ndarray:
    """(H, W): each pixel's distance from the nearest image border, in pixels (model.py ``border_distance``)."""
    return border_distance((h, w))


def figures(amap, score, labels, masks, aupro=True) -> dict:
    f = {"image_auroc": image_auroc(score, labels), "pixel_auroc": pixel_auroc(amap, masks)}
    if aupro:
        f["aupro"] = pixel_aupro(amap, masks)
    return {k: round(float(v), 4) for k, v in f.items()}


def load_held_out(run_dir: str):
    """A trained run in eval mode and its held-out normal samples (its validation split, reproduced from run.json):
    (model, checkpoint, run.json, train config, held-out samples)."""
    model, ckpt = load_run(run_dir)
    model.eval()
    info = json.load(open(f"{run_dir}/run.json"))
    tcfg = from_dict(TrainConfig, info["train_config"])
    d = info["data"]
    train = load_samples(d["format"], d["root"], d["category"], "train", **d.get("options", {}))
    val_min = info["train_config"].get("val_min", 0)  # runs from before TrainConfig.val_min held out the fraction alone
    return model, ckpt, info, tcfg, split_validation(train, tcfg.val_fraction, tcfg.seed, val_min)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--row", nargs=3, action="append", default=[], metavar=("FORMAT", "ROOT", "CATEGORY"))
    ap.add_argument("--out")
    ap.add_argument("--only", help="a regular expression: score only the rules whose names match it")
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, ckpt, info, tcfg, val = load_held_out(a.run_dir)
    pre = preprocess_for(model)
    normals, defective, dmasks = synthetic_validation(val, tcfg.seed)
    n_maps = maps_of(model, [pre(im) for im in normals])
    d_maps = maps_of(model, [pre(im) for im in defective])
    h, w = model.config.input_size
    results = {"run": a.run_dir, "levels": info["model_config"]["levels"], "preset": info.get("preset"),
               "n_val": len(val), "level_stats": {"pixel_mean": n_maps.mean(axis=(1, 2, 3)).tolist(),
                                                  "pixel_std": n_maps.std(axis=(1, 2, 3)).tolist()}}
    fns = {k: f for k, f in rules(model, n_maps).items() if a.only is None or re.fullmatch(a.only, k)}
    syn_masks = np.stack([np.zeros((h, w), bool)] * len(normals) + [_resize_bool(m, (w, h)) for m in dmasks])
    syn_labels = np.r_[np.zeros(len(normals)), np.ones(len(defective))]
    both = np.concatenate([n_maps, d_maps], axis=1)
    results["held_out_synthetic"] = {name: figures(*fn(both), syn_labels, syn_masks)
                                     for name, fn in fns.items()}
    print(json.dumps(results["held_out_synthetic"]), flush=True)
    preprocess = Preprocess.from_dict(ckpt["preprocess"])
    for fmt, root, cat in a.row:
        ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), preprocess)
        items = [ds[i] for i in range(len(ds))]
        maps = maps_of(model, [it["image"] for it in items])
        labels = np.array([it["label"] for it in items])
        masks = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
        results[cat] = {name: figures(*fn(maps), labels, masks) for name, fn in fns.items()}
        print(cat, json.dumps(results[cat]), flush=True)
    if a.out:
        json.dump(results, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
