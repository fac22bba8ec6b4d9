"""The non-aligned test set of the paper (Section 8): random zoom, rotation and translation.

    fastflow evaluate RUN_DIR --data ROOT --category NAME --misalign

MVTec AD images are aligned; real inspection images often are not. The paper "appl[ies] random zoom
in/out with 0.85 ratio, random rotation with +-15 angle, random translation with 0.15 ratio to
expand the original test dataset by 4x". We read that as: the new test set holds ``COPIES = 4``
randomly transformed copies of every test image (the aligned result is reported beside it), each
copy with its own draw of

    scale  uniform in [0.85, 1 / 0.85]   "zoom in/out": 0.85 is the zoom-out limit, its inverse the zoom-in one
    angle  uniform in [-15, 15] degrees   (clockwise positive, as torchvision's affine)
    shift  uniform in [-0.15, 0.15] x width (dx) and x height (dy), rounded to whole pixels
           (torchvision's RandomAffine convention for ``translate=(0.15, 0.15)``)

about the image centre. The image is resampled bilinearly and the mask with nearest neighbour, with
the same parameters (``torchvision.transforms.v2.functional.affine``), so the mask stays binary and
follows its image. Draws are seeded per (seed, image index, copy): the set is reproducible and does
not depend on the order items are read in.

Fill: uncovered corners get the image's own background colour, the per-channel median of its
outermost pixels (white for MVTec bottle), so the test measures misalignment rather than a flat grey
patch the model never saw (with a constant grey fill, a bottle model flagged every image: false-alarm
rate 1.0, pixel AUROC 0.42). ``fill=<float>`` forces a constant in normalised units instead. The mask
is filled with 0: uncovered pixels are normal.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from .data.augment import TRANSLATE, ZOOM, Affine, apply_affine
from .data.augment import POSE_DEGREES as ROTATION_DEGREES

COPIES = 4  # paper Section 8: "expand the original test dataset by 4x"


def draw_affine(seed: int, index: int, copy: int, size: tuple[int, int]) -> Affine:
    """The transform of copy ``copy`` of image ``index``; size is (H, W) of the image."""
    rng = np.random.default_rng([seed, index, copy])
    height, width = size
    scale = float(rng.uniform(*ZOOM))
    angle = float(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    dx = int(round(rng.uniform(-TRANSLATE, TRANSLATE) * width))
    dy = int(round(rng.uniform(-TRANSLATE, TRANSLATE) * height))
    return Affine(angle, (dx, dy), scale)


class MisalignedDataset(Dataset):
    """``copies`` randomly zoomed, rotated and shifted versions of every item of ``base``.

    base: any dataset of ``AnomalyDataset`` items (dicts with ``image`` (3, H, W) normalised and ``mask``
    (1, H, W)). Item ``j`` is copy ``j % copies`` of base item ``j // copies``; it keeps the base item's
    keys, with ``index`` = j, ``source_index`` = the base index and ``copy``.
    """

    def __init__(self, base, copies: int = COPIES, seed: int = 0, fill: float | None = None):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        self.base, self.copies, self.seed, self.fill = base, copies, seed, fill

    def __len__(self) -> int:
        return self.copies * len(self.base)

    def __getitem__(self, j: int) -> dict:
        if not 0 <= j < len(self):
            raise IndexError(f"index {j} out of range for {len(self)} items")
        source, copy = divmod(j, self.copies)
        item = dict(self.base[source])
        t = draw_affine(self.seed, source, copy, tuple(item["image"].shape[-2:]))
        item["image"], item["mask"] = apply_affine(item["image"], item["mask"], t, self.fill)
        item.update(index=j, source_index=source, copy=copy)
        return item


def protocol(seed: int, copies: int = COPIES) -> dict:
    """The settings, for the metrics JSON."""
    return {"copies": copies, "seed": seed, "zoom": list(ZOOM), "rotation_degrees": ROTATION_DEGREES,
            "translate": TRANSLATE, "image_fill": "border colour (per-channel median of the outermost pixels)", "mask_fill": 0}


def evaluate_misaligned(model, samples, preprocess, batch_size: int = 32, threshold: float | None = None,
                        seed: int = 0, progress: bool = False, precision: str = "fp32") -> dict:
    """Metrics (same keys as ``metrics_for``) on the 4x non-aligned test set, plus ``protocol``; on the
    model's device."""
    from .data import AnomalyDataset
    from .evaluate import metrics_for, score_dataset

    dataset = MisalignedDataset(AnomalyDataset(samples, preprocess), seed=seed)
    metrics = metrics_for(score_dataset(model, dataset, batch_size, progress, precision), threshold)
    metrics["protocol"] = protocol(seed)
    return metrics


__all__ = ["COPIES", "ROTATION_DEGREES", "TRANSLATE", "ZOOM", "Affine", "MisalignedDataset", "apply_affine",
           "draw_affine", "evaluate_misaligned", "protocol"]
