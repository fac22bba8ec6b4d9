"""Development suite: the default command on every dataset we have, side by side with PatchCore-lite0.

    .venv/bin/python bench/suite.py --seeds 0 1 2 --out bench/results/suite.json
    .venv/bin/python bench/suite.py --groups bottle,brick --seeds 0 --no-peer --out /tmp/s.json   # a subset

Each training group is trained with exactly the command a user types (plus ``--seed`` and ``--quiet``;
``--format mtd`` names Magnetic Tile's layout), then every row of the group is scored with
``fastflow evaluate``. Rows, real defects first:

    bottle          MVTec AD bottle, its real defects                           (group bottle)
    magnetic_tile   Magnetic Tile Defects, the split of shared/data/README.md    (group mtd)
    bottle_synth    bottle's 20 test/good images and a pasted-defect copy of each (group bottle)
    mtd_synth       Magnetic Tile's 191 test/good images and a pasted copy of each (group mtd)
    brick, grass, moon  scikit-image textures: 96 training crops, 24 good and 24 pasted-defect test crops,
                    all random 192 px crops and quarter turns of the same picture (groups of their own)
    bottle_posed    bottle, every image (training and test) in its own random pose, real defects (group posed)
    gravel_wide     scikit-image gravel in 144x512 frames (half turns only), pasted defects sized by the
                    short side: large non-square frames, stretched to the square input (group wide)
    ihc, cell, coins  as the textures, from scikit-image's immunohistochemistry (stained tissue), cell
                    (microscopy, grey) and coins (grey) pictures: added after every default was set, never tuned on

Pasted defects come from src/fastflow/data/synthetic.py with a fixed seed (the same sets every run);
test images never enter training. PatchCore-lite0 (anomalib 2.7.0 in bench/.venv-anomalib, see
bench/peer/patchcore.py: blocks.2 + blocks.4, 3x3 pooling, 9 neighbours, coreset 1%, 256 px) is run
once per group on the same files and scored with the same metrics code. The datasets are written
under ``--work`` (default /tmp/fastflow-suite; never inside the repository).

Prints one table (ours: mean ± std over the seeds; PatchCore once) with each row's training wall time,
peak memory and, for ours, the share of good test images flagged at the calibrated threshold (asked
for at 1%) and which preset the automatic choice took.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PEER_PY = REPO / "bench" / ".venv-anomalib" / "bin" / "python"
FASTFLOW = [sys.executable, "-m", "fastflow"]
SYNTH_SEED = 2026

# group -> (format, root, category, rows as (row name, format, root, category))
TEXTURES = ("brick", "grass", "moon")
# Added in the twenty-sixth round, after every default was set: pictures no setting was ever chosen on
# (row name -> scikit-image picture): stained tissue (RGB), a microscopy image of cells and coins on a table (grey).
UNSEEN = {"ihc": "immunohistochemistry", "cell": "cell", "coins": "coins"}
WIDE = (144, 512)  # gravel_wide: frames 3.6 times as wide as high, defects sized by the short side


def groups(work: Path) -> dict:
    synth = str(work / "data")
    g = {
        "bottle": ("mvtec", str(SHARED / "mvtec_ad"), "bottle",
                   [("bottle", "real", "mvtec", str(SHARED / "mvtec_ad"), "bottle"),
                    ("bottle_synth", "synthetic", "mvtec", synth, "bottle_synth")]),
        "mtd": ("mtd", str(SHARED / "magnetic_tile"), "magnetic_tile",
                [("magnetic_tile", "real", "mtd", str(SHARED / "magnetic_tile"), "magnetic_tile"),
                 ("mtd_synth", "synthetic", "mvtec", synth, "mtd_synth")]),
    }
    for t in (*TEXTURES, *UNSEEN):
        g[t] = ("mvtec", synth, t, [(t, "synthetic, unseen" if t in UNSEEN else "synthetic", "mvtec", synth, t)])
    g["wide"] = ("mvtec", synth, "gravel_wide", [("gravel_wide", "synthetic, wide", "mvtec", synth, "gravel_wide")])
    g["posed"] = ("mvtec", synth, "bottle_posed", [("bottle_posed", "real, posed", "mvtec", synth, "bottle_posed")])
    return g


# -- the synthetic sets ---------------------------------------------------------------------------
def _write_defects(goods: list[str], cat: Path) -> None:
    from fastflow.data import load_image
    from fastflow.data.synthetic import add_defect

    (cat / "test" / "synthetic").mkdir(parents=True, exist_ok=True)
    (cat / "ground_truth" / "synthetic").mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(goods):
        image = np.asarray(load_image(path))
        bad, mask = add_defect(image, np.random.default_rng((SYNTH_SEED, i)))
        Image.fromarray(bad).save(cat / "test" / "synthetic" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(cat / "ground_truth" / "synthetic" / f"{i:03d}_mask.png")


def _link_all(paths: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        link = folder / f"{i:03d}{Path(p).suffix.lower()}"
        if not link.exists():
            link.symlink_to(os.path.abspath(p))


def prepare(work: Path) -> None:
    """Write the synthetic sets (once; a ``.done`` stamp per set)."""
    from fastflow.data import load_samples

    data = work / "data"
    for name, fmt, root, cat in (("bottle_synth", "mvtec", SHARED / "mvtec_ad", "bottle"),
                                 ("mtd_synth", "mtd", SHARED / "magnetic_tile", "magnetic_tile")):
        out = data / name
        if (out / ".done").exists():
            continue
        train = [s.path for s in load_samples(fmt, str(root), cat, "train")]
        goods = [s.path for s in load_samples(fmt, str(root), cat, "test") if s.label == 0]
        _link_all(train, out / "train" / "good")
        _link_all(goods, out / "test" / "good")
        _write_defects(goods, out)
        (out / ".done").write_text("")
    for t, picture in {**{t: t for t in TEXTURES}, **UNSEEN}.items():  # row -> scikit-image picture
        out = data / t
        if (out / ".done").exists():
            continue
        _texture_set(picture, out)
        (out / ".done").write_text("")
    out = data / "gravel_wide"
    if not (out / ".done").exists():
        _texture_set("gravel", out, crop=WIDE)
        (out / ".done").write_text("")
    out = data / "bottle_posed"
    if not (out / ".done").exists():
        _posed_set(SHARED / "mvtec_ad" / "bottle", out)
        (out / ".done").write_text("")


def _posed_set(src: Path, out: Path) -> None:
    """Every bottle image, training and test alike, in its own random pose (misalign.py's ranges: zoom
    0.85-1.18, +-15 degrees, 15% shift; border-colour fill), masks with it: an object that is not aligned in
    training either, unlike ``evaluate --misalign``, which poses the test images only."""
    import torch

    from fastflow.data import load_image
    from fastflow.data.augment import apply_affine
    from fastflow.misalign import draw_affine

    k = 0
    for split in ("train", "test"):
        for kind in sorted(p.name for p in (src / split).iterdir()):
            (out / split / kind).mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / kind).iterdir()):
                image = torch.from_numpy(np.array(load_image(str(f)))).permute(2, 0, 1).contiguous()
                mask_path = src / "ground_truth" / kind / f"{f.stem}_mask.png"
                mask = (torch.from_numpy(np.array(Image.open(mask_path).convert("L"))).unsqueeze(0)
                        if mask_path.exists() else torch.zeros(1, *image.shape[1:], dtype=torch.uint8))
                image, mask = apply_affine(image, mask, draw_affine(SYNTH_SEED, k, 0, tuple(image.shape[1:])))
                k += 1
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / split / kind / f.name)
                if kind != "good":
                    (out / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                    Image.fromarray((mask[0].numpy() > 127).astype(np.uint8) * 255).save(
                        out / "ground_truth" / kind / f"{f.stem}_mask.png")


def _texture_set(name: str, out: Path, crop: int | tuple[int, int] = 192, n_train: int = 96, n_test: int = 24) -> None:
    """Crops of one scikit-image texture at random places and quarter turns, all drawn alike (as different
    photographs of one material would be): training crops, good test crops, and test crops with a pasted
    defect. Test crops are other draws than the training crops (they may overlap them on the picture).
    A (height, width) crop that is not square turns by half turns only, so every frame has that shape."""
    import skimage.data

    from fastflow.data.synthetic import add_defect

    picture = getattr(skimage.data, name)()
    picture = np.repeat(picture[..., None], 3, axis=2) if picture.ndim == 2 else picture[..., :3]
    h, w = picture.shape[:2]
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    rng = np.random.default_rng((SYNTH_SEED, len(name)))

    def draw() -> np.ndarray:
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        turns = int(rng.integers(4)) if ch == cw else 2 * int(rng.integers(2))
        return np.ascontiguousarray(np.rot90(picture[y:y + ch, x:x + cw], turns))

    sets = {"train/good": [draw() for _ in range(n_train)], "test/good": [draw() for _ in range(n_test)]}
    bad = [add_defect(draw(), np.random.default_rng((SYNTH_SEED, 1000 + i))) for i in range(n_test)]
    sets["test/synthetic"] = [b for b, _ in bad]
    sets["ground_truth/synthetic"] = [m.astype(np.uint8) * 255 for _, m in bad]
    for folder, images in sets.items():
        (out / folder).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            suffix = "_mask" if folder.startswith("ground_truth") else ""
            Image.fromarray(im).save(out / folder / f"{i:03d}{suffix}.png")


# -- running ----------------------------------------------------------------------------------------
def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``); (wall seconds, peak RSS in MB of the child). Raises on failure."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}; see {log}")
    return wall, usage.ru_maxrss / 1024


def ours(group: str, spec, seed: int, work: Path) -> dict:
    fmt, root, cat, rows = spec
    run_dir = work / "runs" / f"{group}_seed{seed}"
    log = work / "logs" / f"{group}_seed{seed}.log"
    cmd = [*FASTFLOW, "train", "--data", root, "--category", cat, "--output", str(run_dir), "--seed", str(seed), "--quiet"]
    if fmt != "mvtec":
        cmd[4:4] = ["--format", fmt]
    wall, rss = run(cmd, log)
    info = json.loads((run_dir / "run.json").read_text())
    hist = json.loads((run_dir / "history.json").read_text())
    out = {"train_wall_s": round(wall, 1), "train_peak_rss_mb": round(rss), "preset": info.get("preset"),
           "auto": info.get("auto"), "best_epoch": hist.get("best_epoch"), "kept_epochs": hist.get("kept_epochs"), "epochs": len(hist["history"]), "rows": {}}
    for row, kind, rfmt, rroot, rcat in rows:
        mpath = work / "runs" / f"{group}_seed{seed}_{row}_metrics.json"
        cmd = [*FASTFLOW, "evaluate", str(run_dir), "--data", rroot, "--category", rcat, "--output", str(mpath), "--quiet"]
        cmd[5:5] = ["--format", rfmt]  # always: evaluate's default is the run's own format
        run(cmd, log)
        m = json.loads(mpath.read_text())
        out["rows"][row] = {k: m.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "false_alarm_rate",
                                                  "n_normal", "n_anomalous", "threshold")}
    return out


def peer(group: str, spec, work: Path) -> dict:
    """PatchCore-lite0 on each row of the group: metrics computed here, with our metrics code."""
    from fastflow.data import Preprocess, load_samples
    from fastflow.metrics import image_auroc, pixel_aupro, pixel_auroc

    fmt, root, cat, rows = spec
    train = [s.path for s in load_samples(fmt, root, cat, "train")]
    out = {}
    for row, kind, rfmt, rroot, rcat in rows:
        test = load_samples(rfmt, rroot, rcat, "test")
        manifest = work / "peer" / f"{row}.json"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"train": train, "test": [{"path": s.path, "label": s.label} for s in test]}))
        npz = work / "peer" / f"{row}.npz"
        log = work / "logs" / f"peer_{row}.log"
        wall, rss = run([str(PEER_PY), str(REPO / "bench" / "peer" / "patchcore.py"), "--manifest", str(manifest),
                         "--output", str(npz)], log)
        res = np.load(npz)
        scores, maps = res["scores"], res["maps"].astype(np.float32)
        labels = np.array([s.label for s in test])
        r = {"image_auroc": image_auroc(scores, labels), "wall_s": round(wall, 1), "peak_rss_mb": round(rss)}
        if all(s.has_mask for s in test):
            pre = Preprocess(maps.shape[1:], (0.5,) * 3, (0.5,) * 3)
            masks = np.stack([pre.resize_mask(s.mask_path if s.label else None, Image.open(s.path).size) for s in test])
            r["pixel_auroc"], r["pixel_aupro"] = pixel_auroc(maps, masks), pixel_aupro(maps, masks)
        out[row] = r
    return out


def _fmt(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(result: dict) -> str:
    lines = ["| row | defects | ours image AUROC | ours pixel AUROC | ours AUPRO | good flagged (1% asked) | auto chose "
             "| PatchCore image | PatchCore pixel | PatchCore AUPRO | ours train wall (s) | ours peak RSS (MB) |",
             "|" + "---|" * 12]
    for group, spec in result["groups"].items():
        for row, kind in spec["rows"]:
            runs = [s for s in spec["seeds"].values()]
            get = lambda k: [r["rows"][row].get(k) for r in runs]
            chose = ", ".join(sorted({str(r["preset"]) for r in runs}))
            p = spec.get("peer", {}).get(row, {})
            lines.append(f"| {row} | {kind} | {_fmt(get('image_auroc'))} | {_fmt(get('pixel_auroc'))} | "
                         f"{_fmt(get('pixel_aupro'))} | {_fmt(get('false_alarm_rate'))} | {chose} | "
                         f"{_fmt([p.get('image_auroc')])} | {_fmt([p.get('pixel_auroc')])} | {_fmt([p.get('pixel_aupro')])} | "
                         f"{_fmt([r['train_wall_s'] for r in runs])} | {_fmt([r['train_peak_rss_mb'] for r in runs])} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--groups", default=",".join(["bottle", "mtd", *TEXTURES, "posed", "wide", *UNSEEN]))
    ap.add_argument("--work", default="/tmp/fastflow-suite")
    ap.add_argument("--out", required=True, help="JSON file; re-runs add to it (finished group/seed pairs are kept)")
    ap.add_argument("--no-peer", action="store_true", help="skip PatchCore")
    ap.add_argument("--table-only", action="store_true", help="print the table of --out and stop")
    a = ap.parse_args()
    work = Path(a.work)
    result = json.loads(Path(a.out).read_text()) if os.path.exists(a.out) else {"groups": {}}
    if not a.table_only:
        (work / "logs").mkdir(parents=True, exist_ok=True)
        prepare(work)
        specs = groups(work)
        for group in a.groups.split(","):
            spec = specs[group]
            entry = result["groups"].setdefault(group, {"rows": [[r[0], r[1]] for r in spec[3]], "seeds": {}})
            if not a.no_peer and "peer" not in entry:
                entry["peer"] = peer(group, spec, work)
                _save(result, a.out)
            for seed in a.seeds:
                if str(seed) in entry["seeds"]:
                    continue
                entry["seeds"][str(seed)] = ours(group, spec, seed, work)
                entry["seeds"][str(seed)]["when"] = time.strftime("%Y-%m-%d %H:%M")
                entry["seeds"][str(seed)]["load_avg"] = os.getloadavg()
                _save(result, a.out)
                print(json.dumps({"group": group, "seed": seed, **{k: v for k, v in entry["seeds"][str(seed)].items()
                                                                    if k != "auto"}}), flush=True)
    print(table(result))
    return 0


def _save(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
