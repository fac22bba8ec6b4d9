"""Training augmentation of FastFlow (paper Section 6.2), applied identically to an image and its mask.

Horizontal flip with p=0.5, vertical flip with p=0.3, rotation with p=0.7. The paper gives no angle
range; we draw the angle uniformly in [-ROTATION_DEGREES, ROTATION_DEGREES]. Uncovered corners are 0.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

ROTATION_DEGREES = 180.0  # any orientation; parts on a turntable or conveyor have no preferred angle

_PIPELINE = v2.Compose([
    v2.RandomHorizontalFlip(p=0.5),
    v2.RandomVerticalFlip(p=0.3),
    v2.RandomApply([v2.RandomRotation(ROTATION_DEGREES, interpolation=InterpolationMode.BILINEAR)], p=0.7),
])


def augment_pair(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip and rotate, same draw for both (torch's global RNG).

    image: (3, H, W) uint8, rotated bilinearly; mask: (1, H, W) bool or uint8, rotated with nearest
    (torchvision treats ``tv_tensors.Mask`` so). Returns plain tensors of the input dtypes.
    """
    out_image, out_mask = _PIPELINE(tv_tensors.Image(image), tv_tensors.Mask(mask.to(torch.uint8)))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).to(mask.dtype)
