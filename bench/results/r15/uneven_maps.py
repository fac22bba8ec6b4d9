"""Magnetic Tile's Uneven defects: what the two recipes' maps show (run from the repository root on the maps
saved by ``bench/explore.py ... --save-maps``): per-image pixel AUROC within the partly masked Uneven tiles,
and a picture of the first six (row 1: tile with its mask in red; row 2: lite0_unaligned's map; row 3:
lite0_texture's map; each map scaled to its own 1st-99.5th percentile).

    PYTHONPATH=src .venv/bin/python bench/results/r15/uneven_maps.py /tmp/s16/mtd_unal_maps.npz \\
        /tmp/s16/mtd_tex_maps.npz bench/results/r15/uneven_maps.jpg
"""
import sys

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from fastflow.data import load_samples
from fastflow.data.preprocess import load_image

samples = load_samples("mtd", "/work/shared/data/magnetic_tile", "magnetic_tile", "test")
types = np.array([s.defect_type for s in samples])
unal, tex = np.load(sys.argv[1]), np.load(sys.argv[2])
uneven = np.where(types == "Uneven")[0]
masks = unal["masks"]
frac = masks[uneven].reshape(len(uneven), -1).mean(1)
print("Uneven mask fraction (256 px): quantiles 0/.25/.5/.75/1", np.quantile(frac, [0, .25, .5, .75, 1]).round(3),
      "empty after resizing:", int((frac == 0).sum()))
for name, d in (("lite0_unaligned", unal), ("lite0_texture", tex)):
    maps = np.minimum(d["maps"].astype(np.float32), 1e30)
    a = np.array([roc_auc_score(masks[i].ravel(), maps[i].ravel()) for i in uneven if 0 < masks[i].mean() < 1])
    print(f"{name}: within-image pixel AUROC over {len(a)} partly masked Uneven tiles: median {np.median(a):.3f}, "
          f"mean {a.mean():.3f}, below 0.5: {np.mean(a < 0.5):.3f}")


def scaled(m):
    m = np.minimum(m.astype(np.float32), 1e6)
    lo, hi = np.percentile(m, 1), np.percentile(m, 99.5)
    return np.stack([(np.clip((m - lo) / (hi - lo + 1e-9), 0, 1) * 255).astype(np.uint8)] * 3, -1)


cols = []
for i in uneven[:6]:
    grey = np.asarray(load_image(samples[i].path).convert("L").resize((256, 256)))
    tile = np.stack([grey] * 3, -1).copy()
    tile[masks[i], 0] = 255
    cols.append(np.concatenate([tile, scaled(unal["maps"][i]), scaled(tex["maps"][i])], 0))
Image.fromarray(np.concatenate(cols, 1)).resize((6 * 160, 3 * 160)).save(sys.argv[3], quality=85)
