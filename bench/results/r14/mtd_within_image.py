"""Is the texture recipe's low pixel AUROC on Magnetic Tile a per-image offset? Its map, and the map minus each
image's median (an experiment)."""
import json, sys
import numpy as np, torch
import explore as E
from fastflow.config import ModelConfig
from fastflow.model import FastFlow
from fastflow.backbones import build_backbone
from fastflow.metrics import image_auroc, pixel_auroc, pixel_aupro

class A: pass
a = A(); a.format, a.data, a.category, a.size, a.backbone, a.split_seed, a.autocontrast = "mtd", "/work/shared/data/magnetic_tile", "magnetic_tile", 256, "efficientnet_lite0", 0, 0.0
E.a = a
d = E.features(a)
real = build_backbone(a.backbone, "random", E.ALL_LEVELS)
levels, sigma = tuple(int(x) for x in sys.argv[1].split(",")), float(sys.argv[2])
keep = [E.ALL_LEVELS.index(l) for l in levels]
pk = lambda f: [f[i] for i in keep]
cfg = ModelConfig(a.backbone, input_size=(256, 256), levels=levels, hidden_ratio=2.0, kernels="3-3", norm_affine=False, smoothing_sigma=sigma)
torch.manual_seed(0)
model = FastFlow(cfg, backbone=E._Shapes(real, keep))
opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
fit = pk(d["fit"]); n = fit[0].shape[0]; step, epoch = 0, 0
while step < 800:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
    for s in range(0, n, 8):
        model.train(); out = model.forward_features([f[order[s:s+8]] for f in fit], with_map=False)
        opt.zero_grad(); out.loss.backward(); opt.step(); step += 1
        if step >= 800: break
    epoch += 1
_, tm = E.scores_and_maps(model, pk(d["test"]))
labels, masks = d["test_labels"].numpy(), d["test_masks"].numpy()
for name, m in [("map", tm), ("map - image median", tm - np.median(tm.reshape(len(tm), -1), 1)[:, None, None])]:
    print(json.dumps({"levels": levels, "variant": name, "test_img": round(image_auroc(m.reshape(len(m), -1).max(1), labels), 4),
                      "test_pix": round(pixel_auroc(m, masks), 4), "test_aupro": round(pixel_aupro(m, masks), 4)}), flush=True)
# defect area share vs. per-image detection: pixel AUROC within defective images only
defect = labels == 1
print(json.dumps({"pixel AUROC on defective images only": round(pixel_auroc(tm[defect], masks[defect]), 4)}))
