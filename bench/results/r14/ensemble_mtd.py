"""Two recipes' maps combined (an experiment): unaligned (level 4, sigma 8) + texture (levels 2,3, sigma 4)
on cached Magnetic Tile features, each map standardised by its held-out normals' pixel mean / std."""
import json, sys, time
import numpy as np, torch
sys.argv = [sys.argv[0]] + sys.argv[1:]
import explore as E
from fastflow.config import ModelConfig
from fastflow.model import FastFlow
from fastflow.backbones import build_backbone
from fastflow.metrics import image_auroc, pixel_auroc, pixel_aupro
from fastflow.train import add_feature_noise

class A: pass
a = A(); a.format, a.data, a.category, a.size, a.backbone, a.split_seed = sys.argv[1], sys.argv[2], sys.argv[3], 256, "efficientnet_lite0", 0
E.a = a
d = E.features(a)
real = build_backbone(a.backbone, "random", E.ALL_LEVELS)
budget = int(sys.argv[4]) if len(sys.argv) > 4 else 800

def train(levels, sigma):
    keep = [E.ALL_LEVELS.index(l) for l in levels]
    pk = lambda f: [f[i] for i in keep]
    cfg = ModelConfig(a.backbone, input_size=(256, 256), levels=levels, hidden_ratio=2.0, kernels="3-3",
                      norm_affine=False, smoothing_sigma=sigma)
    torch.manual_seed(0)
    model = FastFlow(cfg, backbone=E._Shapes(real, keep))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
    fit = pk(d["fit"]); n = fit[0].shape[0]; step, epoch = 0, 0
    while step < budget:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for s in range(0, n, 8):
            model.train(); out = model.forward_features([f[order[s:s+8]] for f in fit], with_map=False)
            opt.zero_grad(); out.loss.backward(); opt.step(); step += 1
            if step >= budget: break
        epoch += 1
    return {k: E.scores_and_maps(model, pk(d[k]))[1] for k in ("val", "syn", "test")}

t0 = time.time()
u = train((4,), 8.0); t = train((2, 3), 4.0)
labels = d["test_labels"].numpy(); masks = d["test_masks"].numpy(); sm = d["syn_masks"].numpy()
nv = u["val"].shape[0]
def report(name, maps):
    vm, s_m, tm = maps["val"], maps["syn"], maps["test"]
    sc = lambda m: m.reshape(len(m), -1).max(1)
    row = {"variant": name,
           "syn_img": round(image_auroc(np.r_[sc(vm), sc(s_m)], np.r_[np.zeros(nv), np.ones(len(s_m))]), 4),
           "syn_pix": round(pixel_auroc(np.r_[vm, s_m], np.r_[np.zeros_like(vm, bool), sm]), 4),
           "test_img": round(image_auroc(sc(tm), labels), 4)}
    if d["test_has_mask"].numpy().all() and masks.any():
        row["test_pix"] = round(pixel_auroc(tm, masks), 4); row["test_aupro"] = round(pixel_aupro(tm, masks), 4)
    print(json.dumps(row), flush=True)
def z(maps):
    mu, sd = maps["val"].mean(), maps["val"].std()
    return {k: (v - mu) / sd for k, v in maps.items()}
report("unaligned", u); report("texture", t)
zu, zt = z(u), z(t)
report("z-sum", {k: zu[k] + zt[k] for k in zu})
report("z-max", {k: np.maximum(zu[k], zt[k]) for k in zu})
# robust: standardise by the held-out maps' per-image max distribution
def zmax(maps):
    m = maps["val"].reshape(nv, -1).max(1); mu, sd = m.mean(), m.std()
    return {k: (v - mu) / sd for k, v in maps.items()}
mu_, mt_ = zmax(u), zmax(t)
report("zmax-sum", {k: mu_[k] + mt_[k] for k in mu_})
print(json.dumps({"seconds": round(time.time() - t0, 1)}))
