"""Twenty-seventh round. How firmly the automatic choice (auto.choose) stands on its synthetic defects: the three
candidates' probes are trained once, exactly as `fastflow train` trains them, and scored on several draws of the
synthetic defects (the shipped draw is seed = the training seed, 2 per held-out image) and with 8 per image; the
pick (auto.pick, margin 0.01) is recorded for each, with each candidate's image AUROC, pixel AUROC and AUPRO
(auto.synthetic_score, which returns all three since 5247cbd; this script first ran with a copy of it that computed the
same). `--n-train N` keeps N of the training images (evenly spread), to see the choice on a small set. Normal images
only; no test image is read. Usage (repository root):
    PYTHONPATH=src python bench/results/r27/choice_draws.py OUT.json FMT ROOT CAT SEED [--n-train N] [--shipped-only] [--val-fraction F] [--val-min N]
"""
import argparse, json, os, shutil, tempfile, time
from dataclasses import replace

import numpy as np

from fastflow.auto import CANDIDATES, DEFECTS_PER_IMAGE, pick, probe_config, synthetic_score, synthetic_validation
from fastflow.config import PRESETS
from fastflow.data import DecodedImages, load_samples
from fastflow.run import load_run
from fastflow.train import split_validation, train

DRAWS = (0, 1000, 2000)  # added to the training seed; 0 is the shipped draw
PER_IMAGE = (DEFECTS_PER_IMAGE, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out"), ap.add_argument("fmt"), ap.add_argument("root"), ap.add_argument("cat")
    ap.add_argument("seed", type=int), ap.add_argument("--n-train", type=int)
    ap.add_argument("--shipped-only", action="store_true", help="only the shipped draw (2 per image, draw 0)")
    ap.add_argument("--val-fraction", type=float, help="hold out this share of the training images (default: the preset's)")
    ap.add_argument("--val-min", type=int, help="and at least this many (default: the preset's; 0 reproduces this "
                    "round's 40-image figures, which predate TrainConfig.val_min)")
    a = ap.parse_args()
    samples = load_samples(a.fmt, a.root, a.cat, "train")
    if a.n_train and a.n_train < len(samples):
        samples = [samples[i] for i in np.linspace(0, len(samples) - 1, a.n_train).round().astype(int)]
    vf = {k: v for k, v in (("val_fraction", a.val_fraction), ("val_min", a.val_min)) if v is not None}
    cands = [(n, PRESETS[n].model, replace(PRESETS[n].train, seed=a.seed, **vf)) for n in CANDIDATES]
    fit, val = split_validation(samples, cands[0][2].val_fraction, a.seed, cands[0][2].val_min)
    decoded, work, models, seconds = DecodedImages(), tempfile.mkdtemp(prefix="cd-"), {}, {}
    for name, m, t in cands:
        t0 = time.perf_counter()
        probe = probe_config(t, len(fit))
        train(m, probe, samples, os.path.join(work, name), progress=False, log=lambda *x, **k: None,
              decoded=decoded, save_every_epoch=False)
        models[name] = load_run(os.path.join(work, name))[0]
        seconds[name] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(work)
    result = {"row": [a.fmt, a.root, a.cat], "seed": a.seed, "n_train": len(samples), "n_val": len(val),
              "probe_seconds": seconds, "draws": []}
    for per_image in PER_IMAGE[:1] if a.shipped_only else PER_IMAGE:
        for d in DRAWS[:1] if a.shipped_only else DRAWS:
            normals, bad, masks = synthetic_validation(val, a.seed + d, per_image)
            scores = {n: synthetic_score(mod, normals, bad, masks) for n, mod in models.items()}
            chosen = pick({n: s["score"] for n, s in scores.items()})
            result["draws"].append({"per_image": per_image, "draw": d, "chosen": chosen,
                                    "scores": {n: [round(s["image_auroc"], 4), round(s["pixel_auroc"], 4), round(s["aupro"], 4)]
                                               for n, s in scores.items()}})
            print(per_image, d, chosen, {n: (round(s["score"], 3), round(s["aupro"], 3)) for n, s in scores.items()}, flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
