"""Accuracy vs epochs for model and map variants (an experiment, not the product path).

    .venv/bin/python bench/bottle_curve.py --bs 8 --epochs 20 --every 10 --ratio 0.5 > bench/results/curves/r05.log
    .venv/bin/python bench/bottle_curve.py --format mtd --data ../shared/data/magnetic_tile --category magnetic_tile ...

Caches the backbone features of the training split (minus the 10% validation hold-out, exactly as
`fastflow train` splits it) and of the test split once, trains the flows (Adam, no gradient clip), and
every few epochs prints the validation NLL and (image AUROC, pixel AUROC, AUPRO) on the test split for
several maps: `ref` (anomalib's reference map), `ll` (log-likelihood, log-det included), `ll_sN`
(with a sigma-N Gaussian blur), `L0`/`L1`/`L2` (one level alone, sigma 4) and `L01`, `L12`, `L02`
(pairs), `L01_sN`. Flows of different levels share no parameters and Adam is per parameter, so a
level's map here is the map a model built with only that level (`--levels`) would give.
`--maps` restricts what is scored; `--ratio`, `--kernels`, `--steps`, `--size`, `--sched cosine`,
`--pool K` (k x k average of the features), `--norm-affine frozen`, `--wd`, `--noise S` (training
features + S x the level's std over the fit set x N(0,1)), `--ln-logdet` (the LayerNorm affine's
Jacobian in the loss; adds maps `lln_sN`) are the variants measured in bench/README.md; `--no-aupro`
and `--image-scores` (top-1% mean and mean of the map as image scores) serve large test sets like
Magnetic Tile. The test split is only *reported* here; it selects nothing inside training.
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
ap.add_argument("--sched", default="const", choices=["const", "cosine"], help="learning-rate schedule")
ap.add_argument("--pool", type=int, default=1, help="k x k average pooling (stride 1) of the cached features")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--format", default="mvtec"); ap.add_argument("--data", default="/work/shared/data/mvtec_ad")
ap.add_argument("--category", default="bottle")
ap.add_argument("--norm-affine", default="train", choices=["train", "frozen"],
                help="frozen: LayerNorm keeps weight 1 / bias 0 (no per-location parameters)")
ap.add_argument("--wd", type=float, default=1e-5)
ap.add_argument("--noise", type=float, default=0.0,
                help="Gaussian noise (times each level's feature std) added to the training features each step")
ap.add_argument("--skip-first", action="store_true", help="no evaluation after epoch 1")
ap.add_argument("--ln-logdet", action="store_true",
                help="count the LayerNorm affine's log|weight| in the loss (its Jacobian), and score maps "
                     "'lln_sN' that include it per location")
ap.add_argument("--no-aupro", action="store_true", help="skip AUPRO (slow on large test sets)")
ap.add_argument("--image-scores", action="store_true",
                help="also image AUROC with the mean of the top 1%% of the map and with the map's mean")
ap.add_argument("--maps", default="", help="comma-separated maps to score (default: all)")
ap.add_argument("--image-only", action="store_true", help="image AUROC only (no pixel metrics; fast)")
ap.add_argument("--levels", default="", help="backbone feature levels, e.g. 3,4 (default: the preset's)")
a = ap.parse_args()
torch.manual_seed(a.seed)
levels = tuple(int(i) for i in a.levels.split(",")) if a.levels else None
cfg = ModelConfig(a.backbone, (a.size, a.size), a.steps, a.ratio, a.kernels, smoothing_sigma=0, levels=levels)
model = FastFlow(cfg)
pre = Preprocess(cfg.input_size, model.backbone.mean, model.backbone.std)
cache = f"/tmp/fastflow-bench-feat_{a.backbone}_{a.size}.pt" if a.category == "bottle" else \
    f"/tmp/fastflow-bench-feat_{a.category}_{a.backbone}_{a.size}.pt"
if levels:
    cache = cache[:-3] + "_L" + "".join(map(str, levels)) + ".pt"
tr = load_samples(a.format, a.data, a.category, "train")
te = load_samples(a.format, a.data, a.category, "test")
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
if a.pool > 1:
    pool = lambda f: F.avg_pool2d(f, a.pool, 1, a.pool // 2, count_include_pad=False)
    d = {k: ([pool(f) for f in v] if k in ("fit", "val", "test") else v) for k, v in d.items()}
masks = d["masks"].numpy(); labels = d["labels"].numpy()
if a.norm_affine == "frozen":
    for p_ in model.norms.parameters():
        p_.requires_grad_(False)
opt = torch.optim.Adam([p_ for p_ in model.trainable_parameters() if p_.requires_grad], lr=a.lr, weight_decay=a.wd)
N = d["fit"][0].shape[0]
steps_total = a.epochs * math.ceil(N / a.bs)
sched = torch.optim.lr_scheduler.LambdaLR(opt, (lambda i: 0.5 * (1 + math.cos(math.pi * i / steps_total)))
                                          if a.sched == "cosine" else (lambda i: 1.0))
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
        if a.ln_logdet:
            lln = torch.stack([F.interpolate(((0.5 * z.pow(2).sum(1) - ld - n.weight.abs().log().sum(0)) / z.shape[1]
                                              + 0.5 * LOG_2PI).unsqueeze(1), size=size, mode="bilinear")
                               for z, ld, n in zip(zs, lds, model.norms)]).mean(0)
            out["lln_s4"] = gaussian_blur(lln, 4); out["lln_s8"] = gaussian_blur(lln, 8)
        out["ref_s4"] = gaussian_blur(ref, 4)
        for sg in (2, 4, 8):
            out[f"ll_s{sg}"] = gaussian_blur(ll, sg)
        lvl = [F.interpolate(((0.5 * z.pow(2).sum(1) - ld) / z.shape[1] + 0.5 * LOG_2PI).unsqueeze(1), size=size,
                             mode="bilinear") for z, ld in zip(zs, lds)]
        for name, idx in (("L0", [0]), ("L1", [1]), ("L2", [2]), ("L01", [0, 1]), ("L12", [1, 2]), ("L02", [0, 2])):
            if max(idx) < len(lvl):  # single levels and pairs, sigma-4 blur: which level localises
                out[name] = gaussian_blur(torch.stack([lvl[i] for i in idx]).mean(0), 4)
        for sg in (2, 6, 8):
            out[f"L01_s{sg}"] = gaussian_blur(torch.stack(lvl[:2]).mean(0), sg)
        nll = sum((0.5 * z.pow(2).flatten(1).sum(1) - ld.flatten(1).sum(1)) for z, ld in zip(zs, lds))
        dims = sum(z[0].numel() for z in zs)
        if a.ln_logdet:
            nll = nll - sum(n.weight.abs().log().sum() for n in model.norms)
        out["_nll"] = float(nll.mean() / dims + 0.5 * LOG_2PI)
    return out
def evaluate(ep):
    bs = 16
    allm = {}
    for i in range(0, len(labels), bs):
        m = maps_of([f[i:i+bs] for f in d["test"]])
        for k, v in m.items():
            if k.startswith("_") or (a.maps and k not in a.maps.split(",")): continue
            allm.setdefault(k, []).append(v[:, 0].numpy())
    val_nll = maps_of(d["val"])["_nll"]
    row = {"epoch": ep, "val_nll": round(val_nll, 4)}
    for k, v in allm.items():
        v = np.concatenate(v)
        flat = v.reshape(len(v), -1)
        row[k] = (round(image_auroc(flat.max(1), labels), 4), None if a.image_only else round(pixel_auroc(v, masks), 4),
                  None if a.no_aupro or a.image_only else round(pixel_aupro(v, masks), 4))
        if a.image_scores:
            top = np.sort(flat, axis=1)[:, -max(1, flat.shape[1] // 100):]
            row[k + "_img_top1pct_mean"] = (round(image_auroc(top.mean(1), labels), 4),
                                            round(image_auroc(flat.mean(1), labels), 4))
    print(json.dumps(row), flush=True)
fstd = [float(f.std()) for f in d["fit"]]
t0 = time.time()
for ep in range(1, a.epochs + 1):
    model.train()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(ep))
    for s in range(0, N, a.bs):
        idx = perm[s:s + a.bs]
        feats = [f[idx] for f in d["fit"]]
        if a.noise > 0:
            feats = [f + a.noise * s_ * torch.randn_like(f) for f, s_ in zip(feats, fstd)]
        out = model.forward_features(feats)
        loss = out.loss
        if a.ln_logdet:  # the affine y = x_hat * w + b is an invertible elementwise map: -sum log|w| per image
            loss = loss - sum(n.weight.abs().log().sum() for n in model.norms)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if ep % a.every == 0 or (ep == 1 and not a.skip_first):
        print("epoch", ep, "time", round(time.time() - t0, 1), flush=True)
        evaluate(ep)
