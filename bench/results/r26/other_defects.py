"""Twenty-sixth round. Defects of kinds the automatic choice never pastes (fastflow.data.synthetic has cutpaste,
scratch, spot, blotch): a blurred region (out of focus, smear), a warped region (dent, bent weave) and a noisy region
(sensor noise, grain), each in a soft-edged ellipse; the mask is the pixels changed by more than 3 levels. Built on
each suite row's good test images; the trained suite runs are scored with `fastflow evaluate` and PatchCore-lite0 is
run once per row (bench/suite.py's peer). Usage (repository root, after bench/suite.py has built its sets and runs):
    python bench/results/r26/other_defects.py OUT.json ROW:RUN_DIR[,RUN_DIR...] ...
"""
import json, subprocess, sys
from pathlib import Path
import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, "bench")
import suite  # noqa: E402

WORK = Path("/tmp/fastflow-suite")
KINDS = ("blur", "warp", "noise")


def region(rng, h, w):
    """A soft-edged ellipse covering 1-6% of the image: weights in [0, 1]."""
    area = rng.uniform(0.01, 0.06) * h * w
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
    ry, rx = np.sqrt(area / np.pi * aspect), np.sqrt(area / np.pi / aspect)
    cy, cx = rng.uniform(ry, h - ry), rng.uniform(rx, w - rx)
    yy, xx = np.mgrid[:h, :w]
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return np.clip((1.3 - d) / 0.6, 0, 1)[..., None]


def defect(image, rng, kind):
    h, w = image.shape[:2]
    im = image.astype(np.float32)
    wgt = region(rng, h, w)
    if kind == "blur":
        changed = ndimage.gaussian_filter(im, sigma=(rng.uniform(2, 5),) * 2 + (0,))
    elif kind == "warp":
        amp, scale = rng.uniform(3, 8), rng.uniform(6, 16)
        dy = ndimage.gaussian_filter(rng.normal(size=(h, w)), scale) * amp * scale
        dx = ndimage.gaussian_filter(rng.normal(size=(h, w)), scale) * amp * scale
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        changed = np.stack([ndimage.map_coordinates(im[..., c], [yy + dy, xx + dx], order=1, mode="reflect")
                            for c in range(3)], -1)
    else:
        noise = rng.normal(0, rng.uniform(12, 30), size=(h, w, 1 if (im[..., 0] == im[..., 1]).all() else 3))
        changed = im + noise
    out = np.clip(im * (1 - wgt) + changed * wgt, 0, 255).round().astype(np.uint8)
    mask = np.abs(out.astype(np.int16) - image.astype(np.int16)).max(-1) > 3
    return out, mask


def visible_defect(image, rng, kind):
    """``defect``, redrawn (at most 20 times) until it changes at least 0.2% of the pixels: a blur of a flat area
    changes nothing."""
    for _ in range(20):
        bad, mask = defect(image, rng, kind)
        if mask.mean() > 0.002:
            break
    return bad, mask


def build(row):
    src, out = WORK / "data" / row, WORK / "data" / f"{row}_other"
    if (out / ".done").exists():
        return out
    goods = sorted((src / "test" / "good").iterdir())
    for sub in ("train/good", "test/good"):
        suite._link_all([str(f.resolve()) for f in sorted((src / sub).iterdir())], out / sub)
    for k in KINDS:
        (out / "test" / k).mkdir(parents=True, exist_ok=True)
        (out / "ground_truth" / k).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(goods):
        image = np.asarray(Image.open(f).convert("RGB"))
        rng = np.random.default_rng((2026, 7, i))
        kind = KINDS[i % len(KINDS)]
        bad, mask = visible_defect(image, rng, kind)
        Image.fromarray(bad).save(out / "test" / kind / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / "ground_truth" / kind / f"{i:03d}_mask.png")
    (out / ".done").write_text("")
    return out


def main():
    out_path = sys.argv[1]
    result = json.load(open(out_path)) if Path(out_path).exists() else {}
    for arg in sys.argv[2:]:
        row, runs = arg.split(":")
        cat = f"{row}_other"
        build(row)
        entry = result.setdefault(row, {"ours": {}})
        for run in runs.split(","):
            if run in entry["ours"]:
                continue
            m = WORK / "runs" / f"{Path(run).name}_{cat}_metrics.json"
            subprocess.run([sys.executable, "-m", "fastflow", "evaluate", run, "--data", str(WORK / "data"), "--format",
                            "mvtec", "--category", cat, "--output", str(m), "--quiet"], check=True)
            mm = json.loads(m.read_text())
            entry["ours"][run] = {k: mm.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "false_alarm_rate")}
            print(row, run, entry["ours"][run], flush=True)
            json.dump(result, open(out_path, "w"), indent=1)
        if "peer" not in entry:
            spec = ("mvtec", str(WORK / "data"), row, [(cat, "other kinds", "mvtec", str(WORK / "data"), cat)])
            entry["peer"] = suite.peer(row, spec, WORK)[cat]
            print(row, "PatchCore", entry["peer"], flush=True)
            json.dump(result, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
