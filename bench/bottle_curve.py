"""Accuracy vs epochs on MVTec bottle for the anomaly-map variants (an experiment, not the product path).

    .venv/bin/python bench/bottle_curve.py --epochs 40 --every 5 --bs 32 > bench/results/bottle_curve_b32.log

Caches the backbone features of the training split (minus the 10% validation hold-out, exactly as
`fastflow train` splits it) and of the test split once, trains the flows, and every few epochs prints
the validation NLL and (image AUROC, pixel AUROC, AUPRO) on the test split for four maps: the
reference map (`ref`, anomalib's), the log-likelihood map (`ll`), and both with a sigma-4 Gaussian
blur (`_s4`). The test split is only *reported* here; it selects nothing inside training.
"""
import sys, time, json, os, math
import numpy as np, torch
import torch.nn.functional as F
torch.set_num_threads(2)
from fastflow.data import load_samples, Preprocess, AnomalyDataset
from fastflow.model import FastFlow, gaussian_blur, LOG_2PI
from fastflow.config import ModelConfig
from fastflow.train import extract_features, split_validation
from fastflow.metrics import image_auroc, pixel_auroc, pixel_aupro
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--backbone", default="efficientnet_lite0"); ap.add_argument("--size", type=int, default=256)
ap.add_argument("--steps", type=int, default=8); ap.add_argument("--ratio", type=float, default=1.0)
ap.add_argument("--kernels", default="3-3"); ap.add_argument("--epochs", type=int, default=40)
ap.add_argument("--every", type=int, default=5); ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--bs", type=int, default=32); ap.add_argument("--tag", default="x")
a = ap.parse_args()
torch.manual_seed(0)
cfg = ModelConfig(a.backbone, (a.size, a.size), a.steps, a.ratio, a.kernels, smoothing_sigma=0)
model = FastFlow(cfg)
pre = Preprocess(cfg.input_size, model.backbone.mean, model.backbone.std)
cache = f"/tmp/fastflow-bench-feat_{a.backbone}_{a.size}.pt"
tr = load_samples("mvtec", "/work/shared/data/mvtec_ad", "bottle", "train")
te = load_samples("mvtec", "/work/shared/data/mvtec_ad", "bottle", "test")
fit_s, val_s = split_validation(tr, 0.1, 0)
if os.path.exists(cache):
    d = torch.load(cache)
else:
    t = time.time()
    dte = AnomalyDataset(te, pre)
    d = {"fit": extract_features(model, AnomalyDataset(fit_s, pre), 32), "val": extract_features(model, AnomalyDataset(val_s, pre), 32),
         "test": extract_features(model, dte, 32),
         "masks": torch.stack([dte[i]["mask"][0] > 0.5 for i in range(len(dte))]), "labels": torch.tensor([s.label for s in te])}
    torch.save(d, cache); print("features", time.time() - t, flush=True)
masks = d["masks"].numpy(); labels = d["labels"].numpy()
opt = torch.optim.Adam(model.trainable_parameters(), lr=a.lr, weight_decay=1e-5)
N = d["fit"][0].shape[0]
def maps_of(feats):
    out = {}
    with torch.inference_mode():
        model.eval()
        zs, lds = [], []
        for f, n, fl in zip(feats, model.norms, model.flows):
            z, ld = fl.forward_map(n(f)); zs.append(z); lds.append(ld)
        size = cfg.input_size
        ref = torch.stack([F.interpolate(-torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True)), size=size, mode="bilinear") for z in zs]).mean(0)
        ll = torch.stack([F.interpolate(((0.5 * z.pow(2).sum(1) - ld) / z.shape[1] + 0.5 * LOG_2PI).unsqueeze(1), size=size, mode="bilinear") for z, ld in zip(zs, lds)]).mean(0)
        out["ref"] = ref; out["ll"] = ll
        out["ref_s4"] = gaussian_blur(ref, 4); out["ll_s4"] = gaussian_blur(ll, 4)
        nll = sum((0.5 * z.pow(2).flatten(1).sum(1) - ld.flatten(1).sum(1)) for z, ld in zip(zs, lds))
        dims = sum(z[0].numel() for z in zs)
        out["_nll"] = float(nll.mean() / dims + 0.5 * LOG_2PI)
    return out
def evaluate(ep):
    bs = 16
    allm = {}
    for i in range(0, len(labels), bs):
        m = maps_of([f[i:i+bs] for f in d["test"]])
        for k, v in m.items():
            if k.startswith("_"): continue
            allm.setdefault(k, []).append(v[:, 0].numpy())
    val_nll = maps_of(d["val"])["_nll"]
    row = {"epoch": ep, "val_nll": round(val_nll, 4)}
    for k, v in allm.items():
        v = np.concatenate(v)
        row[k] = (round(image_auroc(v.reshape(len(v), -1).max(1), labels), 4), round(pixel_auroc(v, masks), 4), round(pixel_aupro(v, masks), 4))
    print(json.dumps(row), flush=True)
t0 = time.time()
for ep in range(1, a.epochs + 1):
    model.train()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(ep))
    for s in range(0, N, a.bs):
        idx = perm[s:s + a.bs]
        out = model.forward_features([f[idx] for f in d["fit"]])
        opt.zero_grad(); out.loss.backward(); opt.step()
    if ep % a.every == 0 or ep == 1:
        print("epoch", ep, "time", round(time.time() - t0, 1), flush=True)
        evaluate(ep)
