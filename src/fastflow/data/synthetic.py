"""Synthetic defects pasted onto normal images, with their masks.

Used where real defects are missing: to choose a configuration without defective images
(``fastflow train``'s automatic choice, train.py) and to build validation sets for the benches
(bench/suite.py). Four kinds, after the self-supervised anomaly literature (CutPaste, NSA, DRAEM):

    cutpaste  a patch of the same image, colour-jittered, pasted at another place (CutPaste)
    scratch   a thin curved stroke, darker or brighter than the part
    spot      a filled ellipse of a foreign colour
    blotch    an irregular blob whose colour is shifted (stain, discolouration)

``add_defect(image, rng)`` returns the defective copy and a bool mask that is True exactly on the
pixels it changed (a pasted pixel that happens to equal the original is left out of the mask), so
metrics on synthetic sets are computed against what was really altered. Grey images get grey defects. Sizes are relative to the
image's shorter side, so the same seed gives the same defect geometry at any scale. Everything is
deterministic given the ``numpy.random.Generator``.

    >>> rng = np.random.default_rng(0)
    >>> bad, mask = add_defect(image, rng)          # image: (H, W, 3) uint8
    >>> bad.shape == image.shape, mask.dtype
    (True, dtype('bool'))
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

KINDS = ("cutpaste", "scratch", "spot", "blotch")


def _box(rng: np.random.Generator, h: int, w: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    """A random (y0, x0, bh, bw) box inside (h, w) whose sides are lo-hi of the shorter side (aspect 1:3-3:1)."""
    side = min(h, w) * rng.uniform(lo, hi)
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
    bh = int(np.clip(round(side * np.sqrt(aspect)), 2, h - 1))
    bw = int(np.clip(round(side / np.sqrt(aspect)), 2, w - 1))
    return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw


def _foreign_colour(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A colour away from the region's mean: darker or brighter by 25-100 levels, slightly tinted (from
    barely visible to obvious, so that a set of them ranks models instead of saturating)."""
    mean = region.reshape(-1, 3).mean(0)
    sign = -1.0 if mean.mean() > 128 else 1.0
    if rng.random() < 0.3:
        sign = -sign
    shift = sign * rng.uniform(25, 100) + rng.uniform(-20, 20, size=3)
    if _is_grey(region):  # grey parts get grey defects: a tint would give them away
        shift = np.full(3, shift.mean())
    return np.clip(mean + shift, 0, 255)


def _is_grey(pixels: np.ndarray) -> bool:
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def _cutpaste(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y0, x0, bh, bw = _box(rng, h, w, 0.08, 0.25)
    patch = image[y0:y0 + bh, x0:x0 + bw].astype(np.float64)
    jitter = rng.uniform(-20, 20, size=3)
    patch = patch * rng.uniform(0.8, 1.2) + (np.full(3, jitter.mean()) if _is_grey(image) else jitter)  # brightness, colour
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    ty, tx = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    out = image.copy()
    out[ty:ty + bh, tx:tx + bw] = np.clip(np.round(patch), 0, 255).astype(np.uint8)
    return out


def _scratch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    length = side * rng.uniform(0.15, 0.5)
    width = max(1, int(round(side * rng.uniform(0.006, 0.02))))
    start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    angle = rng.uniform(0, 2 * np.pi)
    bend = rng.uniform(-0.6, 0.6)
    points = []
    for t in np.linspace(0, 1, 12):  # a gently curved stroke
        a = angle + bend * t
        points.append(tuple(start + length * t * np.array([np.cos(a), np.sin(a)])))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
    region = np.asarray(canvas) > 0
    out = image.copy()
    if region.any():
        out[region] = np.round(_foreign_colour(rng, image[region])).astype(np.uint8)
    return out


def _spot(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y0, x0, bh, bw = _box(rng, h, w, 0.02, 0.08)
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).ellipse([x0, y0, x0 + bw, y0 + bh], fill=255)
    region = np.asarray(canvas) > 0
    out = image.copy()
    out[region] = np.round(_foreign_colour(rng, image[region])).astype(np.uint8)
    return out


def _blotch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape[:2]
    y0, x0, bh, bw = _box(rng, h, w, 0.08, 0.25)
    noise = ndimage.gaussian_filter(rng.standard_normal((bh, bw)), sigma=max(1.0, min(bh, bw) / 6))
    yy, xx = np.mgrid[0:bh, 0:bw]
    ellipse = ((yy - (bh - 1) / 2) / (bh / 2)) ** 2 + ((xx - (bw - 1) / 2) / (bw / 2)) ** 2
    blob = noise / (noise.std() + 1e-12) + 1.5 * (1 - ellipse) > 1.0  # an irregular blob inside the box
    region = np.zeros((h, w), dtype=bool)
    region[y0:y0 + bh, x0:x0 + bw] = blob
    out = image.copy()
    if region.any():
        target = _foreign_colour(rng, image[region])
        mix = rng.uniform(0.3, 0.7)  # a stain: the texture shows through
        out[region] = np.round((1 - mix) * image[region] + mix * target).astype(np.uint8)
    return out


_MAKERS = {"cutpaste": _cutpaste, "scratch": _scratch, "spot": _spot, "blotch": _blotch}


def add_defect(image: np.ndarray, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic defect on a copy of ``image``.

    image: (H, W, 3) uint8, H and W >= 8. rng: the generator every random choice is drawn from.
    kind: one of ``KINDS``, or None for a random one. Returns (defective (H, W, 3) uint8,
    mask (H, W) bool True exactly where a pixel changed). The mask is never empty: a defect that
    changed nothing (a patch pasted onto an identical one) is drawn again.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"add_defect takes an (H, W, 3) uint8 image with H, W >= 8, got {image.shape} {image.dtype}")
    if kind is not None and kind not in _MAKERS:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(KINDS)}")
    for _ in range(20):
        name = kind or KINDS[int(rng.integers(len(KINDS)))]
        out = _MAKERS[name](image, rng)
        mask = (out != image).any(axis=2)
        if mask.sum() >= 4:
            return out, mask
    raise ValueError("could not make a visible defect on this image (is it a single flat colour?)")


def defect_set(images: list[np.ndarray], seed: int, per_image: int = 1) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """``per_image`` defective copies of each image, kinds taken in turn: (images, masks, kinds).

    Deterministic by ``seed``: copy j of image i is drawn from ``default_rng((seed, i, j))``, so images
    added at the end of the list leave the earlier copies unchanged.
    """
    out, masks, kinds = [], [], []
    for bad, mask, kind in iter_defects(images, seed, per_image):
        out.append(bad)
        masks.append(mask)
        kinds.append(kind)
    return out, masks, kinds


def iter_defects(images: list[np.ndarray], seed: int, per_image: int = 1):
    """``defect_set``'s copies one at a time, (defective, mask, kind), the same draws in the same order: for a
    caller that shrinks or converts each copy before the next is made."""
    for i, image in enumerate(images):
        for j in range(per_image):
            kind = KINDS[(i * per_image + j) % len(KINDS)]
            bad, mask = add_defect(image, np.random.default_rng((seed, i, j)), kind)
            yield bad, mask, kind
