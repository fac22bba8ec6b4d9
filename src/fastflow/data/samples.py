"""What a dataset is made of: one ``Sample`` per image, and the one error type the data layer raises."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DatasetError(ValueError):
    """A dataset on disk is missing, malformed or unreadable.

    Messages name the file or folder at fault and say what to do about it.
    """


@dataclass
class Sample:
    """One image of a dataset, described but not loaded.

    ``array`` is set only for in-memory datasets (CIFAR-10): an (H, W, 3) uint8 image that replaces
    reading ``path``, which is then a synthetic name such as ``cifar10/test/000123``.
    """

    path: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images, else the defect's folder or class name
    mask_path: str | None = None  # pixel ground truth; None for normals and for anomalies without mask
    array: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def has_mask(self) -> bool:
        """True when the pixel ground truth is known: all normals, and anomalies with a mask file."""
        return self.label == 0 or self.mask_path is not None
