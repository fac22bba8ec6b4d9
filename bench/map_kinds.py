"""Which synthetic defects rank a run's candidate maps as its real test defects do (twenty-second round).

    PYTHONPATH=src .venv/bin/python bench/map_kinds.py RUN_DIR --row FORMAT ROOT CATEGORY --out F.json \
        [--per-image 4]

For every non-empty subset of the run's levels (its map = the mean of their maps, auto.level_maps) it computes
AUPRO and pixel AUROC on the run's test row and, on synthetic defects pasted on the run's held-out normal images
(``--per-image`` defective copies of each, every kind in turn, data/synthetic.py), AUPRO over all of them, over
each kind alone (with every held-out normal) and over the smaller and the larger half by mask area. The question:
which synthetic set would let ``auto.choose_map`` score maps without the finest level without the wrong switches
of the twentieth round (bench/README.md). Normal images only set the synthetic figures; the test row is read
only to compare.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch

from fastflow.auto import _held_out_images, _strides, level_maps
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.data.preprocess import _resize_bool
from fastflow.data.synthetic import defect_set
from fastflow.metrics import pixel_aupro, pixel_auroc
from fastflow.run import preprocess_for
from fusion import load_held_out  # bench/fusion.py, beside this script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--row", nargs=3, required=True, metavar=("FORMAT", "ROOT", "CATEGORY"))
    ap.add_argument("--per-image", type=int, default=4)
    ap.add_argument("--draws", nargs="*", default=[], metavar="N:SEED",
                    help="more synthetic sets, N defects per held-out image drawn with seed run seed + SEED: AUPRO "
                         "over all of them only (key syn_N:SEED)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, ckpt, _, tcfg, val = load_held_out(a.run_dir)
    normals = _held_out_images(val)  # the automatic choice's held-out images (auto.synthetic_validation's)
    pre = preprocess_for(model)
    h, w = model.config.input_size

    def maps_and_truth(bad, dmasks):  # (N, L, H, W) level maps of the normals and their copies; (N, H, W) masks
        return (level_maps(model, [pre(im) for im in normals + bad]),
                np.stack([np.zeros((h, w), bool)] * len(normals) + [_resize_bool(m, (w, h)) for m in dmasks]))

    defective, masks, kinds = defect_set(normals, seed=tcfg.seed, per_image=a.per_image)
    syn, truth = maps_and_truth(defective, masks)
    area = np.array([m.mean() for m in masks])
    draws = {}
    for spec in a.draws:
        n, off = (int(x) for x in spec.split(":"))
        bad, dm, _ = defect_set(normals, seed=tcfg.seed + off, per_image=n)
        draws[spec] = maps_and_truth(bad, dm)
    groups = {"all": np.ones(len(defective), bool), "small": area <= np.median(area), "large": area > np.median(area)}
    groups.update({k: np.array([x == k for x in kinds]) for k in sorted(set(kinds))})
    ds = AnomalyDataset(load_samples(*a.row, "test"), Preprocess.from_dict(ckpt["preprocess"]))
    items = [ds[i] for i in range(len(ds))]
    test = level_maps(model, [it["image"] for it in items])
    test_masks = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
    strides = _strides(model)
    out = {"run": a.run_dir, "strides": strides, "map_now": list(model.map_index), "n_normal": len(normals),
           "n_defective": len(defective), "subsets": {}}
    for k in range(1, len(strides) + 1):
        for s in itertools.combinations(range(len(strides)), k):
            name = "+".join(str(strides[i]) for i in s)
            r = {"test_aupro": pixel_aupro(test[:, list(s)].mean(1), test_masks),
                 "test_pixel_auroc": pixel_auroc(test[:, list(s)].mean(1), test_masks)}
            smap = syn[:, list(s)].mean(1)
            for g, sel in groups.items():
                keep = np.r_[np.ones(len(normals), bool), sel]
                r[f"syn_{g}"] = pixel_aupro(smap[keep], truth[keep])
            for spec, (maps, tr) in draws.items():
                r[f"syn_{spec}"] = pixel_aupro(maps[:, list(s)].mean(1), tr)
            out["subsets"][name] = {key: round(float(v), 4) for key, v in r.items()}
            print(name, out["subsets"][name], flush=True)
    json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
