"""Where Magnetic Tile's pixel AUROC goes, per defect type (run from the repository root on maps saved by
``bench/explore.py ... --save-maps FILE``): each type's share of the defect pixels, its image AUROC against
the good tiles, its pixel AUROC (its defect pixels against every normal pixel of the test set) and its
pixel AUROC within its own images.

    PYTHONPATH=src .venv/bin/python bench/results/r15/mtd_per_type.py /tmp/s16/mtd_unal_maps.npz
"""
import json
import sys

import numpy as np
from sklearn.metrics import roc_auc_score

from fastflow.data import load_samples

d = np.load(sys.argv[1])
maps, scores, labels, masks = d["maps"].astype(np.float32), d["scores"], d["labels"], d["masks"]
maps = np.minimum(maps, np.finfo(np.float32).max)  # float16 saves of early runs overflowed to inf (rank kept)
types = np.array([s.defect_type for s in load_samples("mtd", "/work/shared/data/magnetic_tile", "magnetic_tile", "test")])
assert len(types) == len(maps)
normal_px = maps[~masks]
sub = np.random.default_rng(0).choice(len(normal_px), 2_000_000, replace=False)  # all normal pixels, subsampled
print(json.dumps({"all": {"pixel_auroc": round(roc_auc_score(masks.ravel(), maps.ravel()), 4),
                          "defect_px": int(masks.sum())}}))
for t in sorted(set(types) - {"good"}):
    sel = types == t
    m, k = maps[sel], masks[sel]
    pos = m[k]
    row = {"type": t, "images": int(sel.sum()), "px_share": round(float(k.sum() / masks.sum()), 3),
           "mask_frac_median": round(float(np.median(k.reshape(len(k), -1).mean(1))), 4),
           "image_auroc": round(roc_auc_score(np.r_[np.zeros((types == "good").sum()), np.ones(sel.sum())],
                                              np.r_[scores[types == "good"], scores[sel]]), 4),
           "pixel_auroc_vs_all_normal": round(roc_auc_score(np.r_[np.zeros(len(sub)), np.ones(len(pos))],
                                                            np.r_[normal_px[sub], pos]), 4),
           "pixel_auroc_within": round(roc_auc_score(k.ravel(), m.ravel()), 4)}
    print(json.dumps(row), flush=True)
keep = types != "Uneven"
print(json.dumps({"without Uneven images": {"pixel_auroc": round(roc_auc_score(masks[keep].ravel(), maps[keep].ravel()), 4),
                                            "image_auroc": round(roc_auc_score(labels[keep], scores[keep]), 4)}}))
from fastflow.metrics import pixel_aupro  # noqa: E402

print(json.dumps({"without Uneven images": {"aupro": round(pixel_aupro(maps[keep], masks[keep]), 4)},
                  "Uneven images and the good ones": {"aupro": round(pixel_aupro(maps[(types == "Uneven") | (labels == 0)],
                                                                                 masks[(types == "Uneven") | (labels == 0)]), 4)}}))
