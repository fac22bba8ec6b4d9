"""``fastflow demo``: the whole job on an embedded synthetic inspection set, offline, in minutes.

    fastflow demo --output demo-output

It writes a small dataset in the MVTec AD layout (real texture photographs shipped with
scikit-image, with synthetic scratches and spots as defects and their masks), trains the offline
default backbone on the normal images, evaluates on the test split and writes
``DIR/metrics.json`` in the same form as ``fastflow evaluate``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from .config import get_preset, replace

TEXTURE = "gravel"  # skimage.data.gravel(): 512x512 grayscale photograph, bundled with scikit-image
CROP = 128
# 60 small training images give 7 optimiser steps per epoch at the preset's batch 8; with the preset's
# feature noise, 20 epochs leave the flows under-trained here (image AUROC 0.90; 40 epochs: 0.95).
DEMO_EPOCHS = 40


def _texture() -> np.ndarray:
    try:
        from skimage import data
    except ImportError as e:
        raise ValueError("the demo's texture photograph comes with scikit-image, which is not installed: "
                         "pip install 'fastflow[demo]' (or pip install scikit-image)") from e

    return getattr(data, TEXTURE)()


def _crop(tex: np.ndarray, rng: np.random.Generator) -> Image.Image:
    y, x = rng.integers(0, tex.shape[0] - CROP), rng.integers(0, tex.shape[1] - CROP)
    patch = tex[y:y + CROP, x:x + CROP].astype(np.float32)
    patch = patch * rng.uniform(0.95, 1.05)  # mild exposure changes between "camera shots"
    return Image.fromarray(np.clip(patch, 0, 255).astype(np.uint8)).convert("RGB")


def _defect(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """Draw a scratch or a spot; return (image, mask)."""
    mask = Image.new("L", img.size, 0)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    s = img.size[0]
    shade = tuple(int(v) for v in rng.choice([rng.integers(0, 40), rng.integers(215, 256)]) * np.ones(3))
    if kind == "scratch":
        x0, y0 = rng.integers(s // 6, 5 * s // 6, size=2)
        angle, length = rng.uniform(0, np.pi), rng.integers(s // 5, s // 2)
        x1, y1 = x0 + length * np.cos(angle), y0 + length * np.sin(angle)
        width = int(rng.integers(3, 6))
        draw.line([(x0, y0), (x1, y1)], fill=shade, width=width)
        mdraw.line([(x0, y0), (x1, y1)], fill=255, width=width)
    else:
        cx, cy = rng.integers(s // 5, 4 * s // 5, size=2)
        r = int(rng.integers(6, 12))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
        mdraw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return img, mask


def make_demo_dataset(root: str, n_train: int = 60, n_test_good: int = 15, n_test_defect: int = 15,
                      seed: int = 0) -> str:
    """Write ``root/texture`` in the MVTec AD layout; returns the category name."""
    rng = np.random.default_rng(seed)
    tex = _texture()
    cat = os.path.join(root, "texture")
    folders = {"train": os.path.join(cat, "train", "good"), "good": os.path.join(cat, "test", "good")}
    for kind in ("scratch", "spot"):
        folders[kind] = os.path.join(cat, "test", kind)
        folders[kind + "_gt"] = os.path.join(cat, "ground_truth", kind)
    for f in folders.values():
        os.makedirs(f, exist_ok=True)
    for i in range(n_train):
        _crop(tex, rng).save(os.path.join(folders["train"], f"{i:03d}.png"))
    for i in range(n_test_good):
        _crop(tex, rng).save(os.path.join(folders["good"], f"{i:03d}.png"))
    for i in range(n_test_defect):
        kind = "scratch" if i % 2 == 0 else "spot"
        img, mask = _defect(_crop(tex, rng), kind, rng)
        img.save(os.path.join(folders[kind], f"{i:03d}.png"))
        mask.save(os.path.join(folders[kind + "_gt"], f"{i:03d}_mask.png"))
    return "texture"


def run_demo(output: str, epochs: int | None = None, progress: bool = True, log=print, device="auto",
             precision: str = "fp32") -> dict:
    """The demo on ``device`` (device.py: auto, cpu, cuda, cuda:N, mps) at ``precision``; returns the metrics."""
    from .data import Preprocess, load_samples
    from .evaluate import evaluate_model, format_table
    from .run import load_run
    from .train import train

    t0 = time.perf_counter()
    data_root = os.path.join(output, "data")
    log(f"writing a synthetic inspection set ({TEXTURE} texture, scratches and spots) to {data_root}")
    cat = make_demo_dataset(data_root)
    preset = get_preset("efficientnet_lite0")
    # The blur sigma is in pixels at the input size: keep it the same fraction of the image at the crop size.
    sigma = preset.model.smoothing_sigma * CROP / preset.model.input_size[0]
    model_cfg = replace(preset.model, input_size=(CROP, CROP), smoothing_sigma=sigma)
    train_cfg = replace(preset.train, epochs=epochs or DEMO_EPOCHS, steps=None)  # a fixed, short length
    run_dir = os.path.join(output, "run")
    res = train(model_cfg, train_cfg, load_samples("mvtec", data_root, cat, "train"), run_dir, progress=progress,
                log=log, device=device, precision=precision)
    model, ckpt = load_run(run_dir)
    metrics, _ = evaluate_model(model, load_samples("mvtec", data_root, cat, "test"),
                                Preprocess.from_dict(ckpt["preprocess"]), 16, ckpt["threshold"]["value"],
                                device=device, precision=precision)
    metrics["category"] = cat
    metrics["train_seconds"] = res.train_seconds
    metrics["total_seconds"] = time.perf_counter() - t0
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    log(format_table({cat: metrics}))
    log(f"done in {metrics['total_seconds']:.0f} s. Model: {run_dir}/model.pt, metrics: {output}/metrics.json")
    return metrics
