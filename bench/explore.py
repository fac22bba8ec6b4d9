"""Recipe exploration on cached features (an experiment tool, not the product path).

    .venv/bin/python bench/explore.py --category bottle --levels 1,2,3 --budget 1200 --every 300
    .venv/bin/python bench/explore.py --format mtd --data ../shared/data/magnetic_tile --category magnetic_tile \\
        --levels 4 --no-affine --ratio 2 --kernels 3-3 --noise 0

Splits the training images exactly as ``fastflow train`` does (10% held out, seed 0), caches the lite0
features of levels 1-4 of the fit set, the held-out normals, synthetic defects pasted on the held-out
normals (data/synthetic.py, two per image) and the test split (``--backbone`` lite1 / lite2: cached
apart), trains the flows of one recipe with the trainer's optimiser and feature noise for a budget of
optimiser steps, and every ``--every`` steps prints one JSON line: the held-out NLL, the synthetic-defect
image / pixel AUROC (what a choice without defective images can see) and the test split's image / pixel
AUROC (what a user would get; reported, never used inside). AUPRO on the test split at the end
(``--aupro``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

from fastflow.config import ModelConfig
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.data.synthetic import defect_set
from fastflow.metrics import image_auroc, pixel_aupro, pixel_auroc
from fastflow.model import FastFlow
from fastflow.train import add_feature_noise, extract_features, split_validation
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

ALL_LEVELS = (1, 2, 3, 4)


class _Shapes(torch.nn.Module):
    """A stand-in backbone that only reports feature shapes (the features are cached)."""

    def __init__(self, real, keep: list[int], shapes=None):
        super().__init__()
        self.needs_norm, self.mean, self.std = real.needs_norm, real.mean, real.std
        self._shapes = shapes or [real.feature_shapes((a.size, a.size))[i] for i in keep]
        self.num_parameters = 0

    def feature_shapes(self, input_size):
        return self._shapes


def _extract(model, images: list[np.ndarray], pre) -> list[torch.Tensor]:
    x = torch.stack([pre.normalize(torch.from_numpy(im).permute(2, 0, 1)) for im in images])
    with torch.inference_mode():
        return [torch.cat(parts) for parts in zip(*[model.extract(x[i:i + 32]) for i in range(0, len(x), 32)])]


def features(a) -> dict:
    """Cached features of fit / val / test (and the val images at input size), plus the synthetic set,
    cached apart under a hash of data/synthetic.py so a changed generator recomputes only that."""
    import hashlib

    import fastflow.data.synthetic as synthetic
    tag = ("" if a.backbone == "efficientnet_lite0" else f"_{a.backbone}") + (f"_ac{a.autocontrast:g}" if a.autocontrast else "")
    path = f"/tmp/explore_{a.category}_{a.size}_s{a.split_seed}{tag}.pt"
    model = FastFlow(ModelConfig(a.backbone, input_size=(a.size, a.size), levels=ALL_LEVELS))
    pre = Preprocess((a.size, a.size), model.backbone.mean, model.backbone.std, autocontrast=a.autocontrast or None)
    if os.path.exists(path):
        d = torch.load(path, weights_only=False)
        if "val_images" not in d:  # caches from before the images were kept
            train = load_samples(a.format, a.data, a.category, "train")
            d["val_images"] = [img for img, _ in AnomalyDataset(split_validation(train, 0.1, a.split_seed)[1], pre)._decoded]
            torch.save(d, path)
    else:
        t0 = time.time()
        train = load_samples(a.format, a.data, a.category, "train")
        test = load_samples(a.format, a.data, a.category, "test")
        fit_s, val_s = split_validation(train, 0.1, a.split_seed)
        dval = AnomalyDataset(val_s, pre)
        dte = AnomalyDataset(test, pre)
        d = {"fit": extract_features(model, AnomalyDataset(fit_s, pre), 32), "val": extract_features(model, dval, 32),
             "val_images": [img for img, _ in dval._decoded],
             "test": extract_features(model, dte, 32),
             "test_masks": torch.stack([dte[i]["mask"][0] > 0.5 for i in range(len(dte))]),
             "test_labels": torch.tensor([s.label for s in test]),
             "test_has_mask": torch.tensor([bool(s.has_mask) for s in test])}
        torch.save(d, path)
        print(json.dumps({"features_s": round(time.time() - t0, 1), "n_fit": len(fit_s), "n_val": len(val_s),
                          "n_test": len(test)}), flush=True)
    key = hashlib.sha1(open(synthetic.__file__, "rb").read()).hexdigest()[:8]
    spath = f"/tmp/explore_syn_{a.category}_{a.size}_s{a.split_seed}{tag}_{key}.pt"
    if os.path.exists(spath):
        d.update(torch.load(spath, weights_only=False))
    else:
        images, masks, _ = synthetic.defect_set(d["val_images"], seed=1234, per_image=2)
        syn = {"syn": _extract(model, images, pre), "syn_masks": torch.from_numpy(np.stack(masks))}
        torch.save(syn, spath)
        d.update(syn)
    return d


def scores_and_maps(model, feats, bs=32):
    model.eval()
    s, m = [], []
    with torch.inference_mode():
        for i in range(0, feats[0].shape[0], bs):
            out = model.forward_features([f[i:i + bs] for f in feats], model.config.input_size)
            s.append(out.score.numpy())
            m.append(out.anomaly_map[:, 0].numpy())
    return np.concatenate(s), np.concatenate(m)


def nll(model, feats):
    model.eval()
    with torch.inference_mode():
        return float(np.mean([model.forward_features([f[i:i + 32] for f in feats], with_map=False).nll_per_dim.item()
                              for i in range(0, feats[0].shape[0], 32)]))


def level_maps(model, feats, bs=32):
    """Per level, the per-location NLL per channel upsampled to input size and blurred: (L, N, H, W)."""
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur
    model.eval()
    size, sigma = model.config.input_size, model.config.smoothing_sigma
    k = int(2 * round(4 * sigma) + 1)
    out = []
    with torch.inference_mode():
        for i in range(0, feats[0].shape[0], bs):
            per = []
            for f, norm, flow in zip([f[i:i + bs] for f in feats], model.norms, model.flows):
                z, ld = flow.forward_map(norm(f))
                m = (0.5 * z.pow(2).sum(1) - ld) / z.shape[1]
                m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)
                per.append(gaussian_blur(m, [k, k], [sigma, sigma])[:, 0])
            out.append(torch.stack(per))
    return torch.cat(out, 1).numpy()


def variants(model, val, syn, test, d, labels, masked):
    """Image / pixel AUROC of map aggregations: the mean of the levels (today), the mean and the max of the
    levels standardised by the held-out normals' mean and std of that level's map, and top-1% mean scores."""
    vl, sl, tl = level_maps(model, val), level_maps(model, syn), level_maps(model, test)
    mu = vl.reshape(len(vl), -1).mean(1)[:, None, None, None]
    sd = vl.reshape(len(vl), -1).std(1)[:, None, None, None]
    n_val = vl.shape[1]
    for name, agg in [("mean", lambda x: x.mean(0)), ("zmean", lambda x: ((x - mu) / sd).mean(0)),
                      ("zmax", lambda x: ((x - mu) / sd).max(0))]:
        vm, sm, tm = agg(vl), agg(sl), agg(tl)
        for sname, sc in [("max", lambda m: m.reshape(len(m), -1).max(1)),
                          ("top1", lambda m: np.sort(m.reshape(len(m), -1), 1)[:, -m[0].size // 100:].mean(1))]:
            vs, ss, ts = sc(vm), sc(sm), sc(tm)
            row = {"variant": f"{name}/{sname}",
                   "syn_img": round(image_auroc(np.r_[vs, ss], np.r_[np.zeros(n_val), np.ones(len(ss))]), 4),
                   "syn_pix": round(pixel_auroc(np.r_[vm, sm], np.r_[np.zeros_like(vm, bool), d["syn_masks"].numpy()]), 4),
                   "test_img": round(image_auroc(ts, labels), 4)}
            if masked.all() and d["test_masks"].any():
                row["test_pix"] = round(pixel_auroc(tm, d["test_masks"].numpy()), 4)
                if a.aupro and sname == "max":
                    row["test_aupro"] = round(pixel_aupro(tm, d["test_masks"].numpy()), 4)
            print(json.dumps(row), flush=True)
    # the image score from the deepest level alone (its max), the map from the others' aggregation
    vs, ss, ts = (x[-1].reshape(x.shape[1], -1).max(1) for x in (vl, sl, tl))
    row = {"variant": "score from the deepest level's max",
           "syn_img": round(image_auroc(np.r_[vs, ss], np.r_[np.zeros(n_val), np.ones(len(ss))]), 4),
           "test_img": round(image_auroc(ts, labels), 4)}
    print(json.dumps(row), flush=True)


def locnorm(model, fit, val, syn, test, d, labels, masked):
    """Image / pixel AUROC of the map standardised per location: minus the normal images' mean map at that
    pixel (fit = the training images' maps, val = the held-out normals'), and divided by their std there."""
    _, fm = scores_and_maps(model, fit)
    vs0, vm = scores_and_maps(model, val)
    _, sm = scores_and_maps(model, syn)
    _, tm = scores_and_maps(model, test)
    n_val = len(vm)
    stats = {"fit": (fm.mean(0), fm.std(0)), "val": (vm.mean(0), vm.std(0))}
    del fm
    for name in ("none", "fit-mean", "fit-z", "val-mean", "val-z", "fit-z-global"):
        if name == "none":
            f = lambda m: m
        else:
            mu, sd = stats[name.split("-")[0]]
            if name.endswith("mean"):
                f = lambda m, mu=mu: m - mu
            elif name.endswith("global"):  # the std map floored at its median: no division by near-zero stds
                fl = np.maximum(sd, np.median(sd))
                f = lambda m, mu=mu, fl=fl: (m - mu) / fl
            else:
                f = lambda m, mu=mu, sd=sd: (m - mu) / (sd + 1e-3 * sd.mean())
        v, s_, t = f(vm), f(sm), f(tm)
        vs, ss, ts = (x.reshape(len(x), -1).max(1) for x in (v, s_, t))
        row = {"locnorm": name,
               "syn_img": round(image_auroc(np.r_[vs, ss], np.r_[np.zeros(n_val), np.ones(len(ss))]), 4),
               "syn_pix": round(pixel_auroc(np.r_[v, s_], np.r_[np.zeros_like(v, bool), d["syn_masks"].numpy()]), 4),
               "test_img": round(image_auroc(ts, labels), 4)}
        if masked.all() and d["test_masks"].any():
            row["test_pix"] = round(pixel_auroc(t, d["test_masks"].numpy()), 4)
            if a.aupro:
                row["test_aupro"] = round(pixel_aupro(t, d["test_masks"].numpy()), 4)
        print(json.dumps(row), flush=True)


def with_context(feats: list[torch.Tensor], k: int, bs: int = 64) -> list[torch.Tensor]:
    """Each level's features with ``k`` channels of context appended: the image's spatial mean of that
    level's features, projected by a fixed random orthonormal matrix (seed 0) and broadcast over the map,
    so the flow models each location jointly with the image's overall look."""
    out = []
    for f in feats:
        g = torch.Generator().manual_seed(0)
        proj = torch.linalg.qr(torch.randn(f.shape[1], k, generator=g))[0] * (f.shape[1] / k) ** 0.5
        parts = []
        for i in range(0, f.shape[0], bs):
            x = f[i:i + bs]
            ctx = (x.mean((2, 3)) @ proj)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            parts.append(torch.cat([x, ctx], 1))
        out.append(torch.cat(parts))
    return out


def transform(feats: list[torch.Tensor], pool: int, fuse: bool, bs: int = 64) -> list[torch.Tensor]:
    """PatchCore's ingredients on cached features: a ``pool`` x ``pool`` local average (stride 1), and the
    levels fused into one (deeper ones upsampled bilinearly to the finest one's grid, channels concatenated)."""
    import torch.nn.functional as F
    out = []
    for i in range(0, feats[0].shape[0], bs):
        part = [f[i:i + bs] for f in feats]
        if pool > 1:
            part = [F.avg_pool2d(f, pool, 1, pool // 2, count_include_pad=False) for f in part]
        if fuse:
            size = part[0].shape[-2:]
            part = [torch.cat([part[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                                           for f in part[1:]], 1)]
        out.append(part)
    return [torch.cat(x) for x in zip(*out)]


def measure(model, a, d, val, syn, test, labels, masked, step) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Held-out NLL, synthetic and test figures of ``model`` (the trained flows, or an average of them), the good
    test images flagged at the held-out max; and the held-out scores, test scores and test maps."""
    row = {"step": step, "val_nll": round(nll(model, val), 4)}
    vs, vm = scores_and_maps(model, val)
    ss, sm = scores_and_maps(model, syn)
    row["syn_img"] = round(image_auroc(np.r_[vs, ss], np.r_[np.zeros(len(vs)), np.ones(len(ss))]), 4)
    row["syn_pix"] = round(pixel_auroc(np.r_[vm, sm], np.r_[np.zeros_like(vm, bool), d["syn_masks"].numpy()]), 4)
    ts, tm = scores_and_maps(model, test)
    row["test_img"] = round(image_auroc(ts, labels), 4)
    if masked.all() and d["test_masks"].any():
        row["test_pix"] = round(pixel_auroc(tm, d["test_masks"].numpy()), 4)
        if a.aupro and step == a.budget:
            row["test_aupro"] = round(pixel_aupro(tm, d["test_masks"].numpy()), 4)
    thr = np.sort(vs)[min(len(vs) - 1, int(np.ceil(0.99 * len(vs))) - 1)]
    row["test_good_fa"] = round(float((ts[labels == 0] > thr).mean()), 3)
    return row, vs, ts, tm


def main():
    global a
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="mvtec")
    ap.add_argument("--data", default="/work/shared/data/mvtec_ad")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="efficientnet_lite0 / 1 / 2 (offline weights)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--levels", default="1,2,3")
    ap.add_argument("--no-affine", action="store_true")
    ap.add_argument("--ln-logdet", action="store_true")
    ap.add_argument("--map-levels", default="", help="levels of the anomaly map (ModelConfig.map_levels); all if empty")
    ap.add_argument("--score-levels", default="", help="levels of the image score (ModelConfig.score_levels)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--kernels", default="3-1")
    ap.add_argument("--flow-steps", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--sigma", type=float, default=8.0)
    ap.add_argument("--budget", type=int, default=1200, help="optimiser steps")
    ap.add_argument("--every", type=int, default=300)
    ap.add_argument("--aupro", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--variants", action="store_true",
                    help="at the end, also score with each level's map standardised on the held-out normals")
    ap.add_argument("--locnorm", action="store_true",
                    help="at the end, also score with the map standardised per location on normal images' maps")
    ap.add_argument("--save-maps", default="", help="at the end, save the test maps, scores and truth (.npz)")
    ap.add_argument("--context", type=int, default=0,
                    help="append K channels of the image's mean feature (randomly projected) at every location")
    ap.add_argument("--pool", type=int, default=1, help="local average of the features (PatchCore: 3)")
    ap.add_argument("--fuse", action="store_true", help="one flow on the levels concatenated at the finest grid")
    ap.add_argument("--ema", default="",
                    help="decays, e.g. 0.99,0.995: also score exponential moving averages of the flows' parameters")
    ap.add_argument("--autocontrast", type=float, default=0.0,
                    help="per-image contrast stretch (ModelConfig.autocontrast; cached apart; defects pasted after it)")
    a = ap.parse_args()
    torch.set_num_threads(2)
    d = features(a)
    keep = [ALL_LEVELS.index(int(x)) for x in a.levels.split(",")]
    pick = lambda feats: [feats[i] for i in keep]
    from fastflow.backbones import build_backbone
    real = build_backbone(a.backbone, "random", ALL_LEVELS)
    listed = lambda text: tuple(int(x) for x in text.split(",")) if text else None
    cfg = ModelConfig(a.backbone, input_size=(a.size, a.size), levels=listed(a.levels),
                      hidden_ratio=a.ratio, kernels=a.kernels, flow_steps=a.flow_steps, norm_affine=not a.no_affine, norm_logdet=a.ln_logdet,
                      smoothing_sigma=a.sigma,
                      map_levels=listed(a.map_levels), score_levels=listed(a.score_levels))
    fit, val, syn, test = (transform(pick(d[k]), a.pool, a.fuse) for k in ("fit", "val", "syn", "test"))
    if a.context:
        fit, val, syn, test = (with_context(x, a.context) for x in (fit, val, syn, test))
    torch.manual_seed(a.seed)
    model = FastFlow(cfg, backbone=_Shapes(real, keep, [tuple(f.shape[1:]) for f in fit]))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=a.lr, weight_decay=1e-5, fused=True)
    n = fit[0].shape[0]
    labels = d["test_labels"].numpy()
    masked = d["test_has_mask"].numpy()
    emas = {float(x): AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(x)), use_buffers=True)
            for x in a.ema.split(",") if x}
    step, epoch, t0 = 0, 0, time.time()
    while step < a.budget:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(a.seed * 100003 + epoch))
        for s in range(0, n, a.bs):
            idx = order[s:s + a.bs]
            feats = [f[idx] for f in fit]
            if a.noise > 0:
                feats = add_feature_noise(feats, a.noise, [(a.seed * 1000003 + epoch) * 1000003 + int(i) for i in idx])
            model.train()
            out = model.forward_features(feats, with_map=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            for ema in emas.values():
                ema.update_parameters(model)
            step += 1
            if step % a.every == 0 or step == a.budget:
                train_s = round(time.time() - t0, 1)
                row, vs, ts, tm = measure(model, a, d, val, syn, test, labels, masked, step)
                row = {"tag": a.tag, "epoch": round(step * a.bs / n, 1), "train_s": train_s, **row}
                print(json.dumps(row), flush=True)
                for decay, ema in emas.items():
                    print(json.dumps({"ema": decay, **measure(ema.module, a, d, val, syn, test, labels, masked, step)[0]}),
                          flush=True)
                if a.variants and step == a.budget:
                    variants(model, val, syn, test, d, labels, masked)
                if a.save_maps and step == a.budget:
                    np.savez_compressed(a.save_maps, maps=tm.astype(np.float32), scores=ts, labels=labels,
                                        masks=d["test_masks"].numpy())
                if a.locnorm and step == a.budget:
                    locnorm(model, fit, val, syn, test, d, labels, masked)
                t0 = time.time() - row["train_s"]
            if step >= a.budget:
                break
        epoch += 1


if __name__ == "__main__":
    main()
