"""Training augmentation, applied identically to an image and its mask.

Two kinds (``TrainConfig.augment``, CLI ``train --augment [paper|pose]``):

- ``"paper"`` (paper Section 6.2): horizontal flip with p=0.5, vertical flip with p=0.3, rotation with p=0.7.
  The paper gives no angle range; we draw the angle uniformly in [-ROTATION_DEGREES, ROTATION_DEGREES].
  Uncovered corners are 0.
- ``"pose"``: the random zoom, rotation and shift of the paper's non-aligned test (Section 8, see
  ``fastflow.misalign``), drawn afresh for every image at every step: scale in [0.85, 1 / 0.85], angle
  in [-15, 15] degrees, shift up to 15% of the width and height, uncovered corners filled with the image's
  own background colour. A model trained so expects parts anywhere in that range of poses.

The affine pieces (``Affine``, ``apply_affine``, ``border_colour``, the ranges) live here, below the
misaligned test set that uses the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from ..config import augment_kind

ROTATION_DEGREES = 180.0  # "paper": any orientation; parts on a turntable or conveyor have no preferred angle

_PIPELINE = v2.Compose([
    v2.RandomHorizontalFlip(p=0.5),
    v2.RandomVerticalFlip(p=0.3),
    v2.RandomApply([v2.RandomRotation(ROTATION_DEGREES, interpolation=InterpolationMode.BILINEAR)], p=0.7),
])

# "pose" and the non-aligned test set (paper Section 8)
ZOOM = (0.85, 1 / 0.85)  # "zoom in/out with 0.85 ratio"
POSE_DEGREES = 15.0  # "rotation with +-15 angle"
TRANSLATE = 0.15  # "translation with 0.15 ratio", a fraction of width / height


@dataclass(frozen=True)
class Affine:
    """One draw: ``angle`` degrees (clockwise, as ``TF.affine``), ``translate`` (dx, dy) pixels, ``scale``."""

    angle: float
    translate: tuple[int, int]
    scale: float


def border_colour(image: torch.Tensor) -> list[float]:
    """Per-channel median of the outermost pixels of a (C, H, W) image: its background colour."""
    edge = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    return [float(v) for v in edge.median(dim=1).values]


def apply_affine(image: torch.Tensor, mask: torch.Tensor, t: Affine, fill: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same affine map on an image (bilinear, ``fill``; None: its border colour) and its mask (nearest, 0).

    image: (C, H, W) float or uint8; mask: (1, H, W). Returns tensors of the same shapes and dtypes.
    """
    common = dict(angle=t.angle, translate=list(t.translate), scale=t.scale, shear=[0.0, 0.0])
    fill = border_colour(image) if fill is None else fill
    image = TF.affine(image, **common, interpolation=InterpolationMode.BILINEAR, fill=fill)
    mask = TF.affine(mask, **common, interpolation=InterpolationMode.NEAREST, fill=0.0)
    return image, mask


def random_pose(size: tuple[int, int], generator: torch.Generator | None = None) -> Affine:
    """A pose drawn uniformly from the ranges above (torch's global RNG unless ``generator``); size (H, W)."""
    u = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
    height, width = size
    return Affine(angle=(2 * u[1] - 1) * POSE_DEGREES,
                  translate=(int(round((2 * u[2] - 1) * TRANSLATE * width)),
                             int(round((2 * u[3] - 1) * TRANSLATE * height))),
                  scale=ZOOM[0] + u[0] * (ZOOM[1] - ZOOM[0]))


def augment_pair(image: torch.Tensor, mask: torch.Tensor, kind: str = "paper") -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transform an image and its mask with the same draw (torch's global RNG).

    image: (3, H, W) uint8, resampled bilinearly; mask: (1, H, W) bool or uint8, with nearest.
    Returns plain tensors of the input dtypes.
    """
    if augment_kind(kind) == "pose":
        out_image, out_mask = apply_affine(image, mask.to(torch.uint8), random_pose(tuple(image.shape[-2:])))
        return out_image, out_mask.to(mask.dtype)
    out_image, out_mask = _PIPELINE(tv_tensors.Image(image), tv_tensors.Mask(mask.to(torch.uint8)))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).to(mask.dtype)
