"""The torch Dataset over a list of Samples, and the up-front check that every file is readable."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..config import augment_kind
from .augment import augment_pair
from .files import format_paths
from .preprocess import Preprocess, load_image, load_mask
from .samples import DatasetError, Sample

CACHE_LIMIT = 2000  # images; 2000 x 256 x 256 x 3 bytes is about 0.4 GB of uint8


def _read_all(function, items: list) -> list:
    """``function`` over ``items`` in threads (Pillow decodes without the GIL), results in order."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(function, items))


class AnomalyDataset(torch.utils.data.Dataset):
    """Samples served as network inputs.

    Each item is a dict: ``image`` (3, H, W) float32, normalised; ``mask`` (1, H, W) float32 of 0/1
    (zeros for normals and for anomalies without mask); ``label`` int (1 anomalous); ``has_mask`` bool
    (False only for anomalies without mask); ``path`` str; ``index`` int (position in ``samples``).

    With ``cache`` (default: sets of at most CACHE_LIMIT images) every image is decoded once, here,
    and kept as uint8 at input size; augmentation is then applied on the fly to the cached copy.
    """

    def __init__(self, samples: list[Sample], preprocess: Preprocess, augment: bool | str | None = None,
                 cache: bool | None = None) -> None:
        if not samples:
            raise DatasetError("AnomalyDataset got no samples; check the dataset root, category and split")
        self.samples = list(samples)
        self.preprocess = preprocess
        self.augment = augment_kind(augment)  # None, "paper" or "pose" (data/augment.py)
        self.cache = len(self.samples) <= CACHE_LIMIT if cache is None else cache
        self._decoded = _read_all(self._decode, range(len(self.samples))) if self.cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(H, W, 3) uint8 image and (H, W) bool mask at input size."""
        sample = self.samples[index]
        image = Image.fromarray(sample.array) if sample.array is not None else load_image(sample.path)
        mask_path = sample.mask_path if sample.label == 1 else None
        return self.preprocess.resize_image(image), self.preprocess.resize_mask(mask_path, image.size)

    def __getitem__(self, index: int) -> dict:
        image, mask = self._decoded[index] if self._decoded is not None else self._decode(index)
        image = torch.from_numpy(image).permute(2, 0, 1)
        mask = torch.from_numpy(mask)[None]
        if self.augment:
            image, mask = augment_pair(image, mask, self.augment)
        sample = self.samples[index]
        return {"image": self.preprocess.normalize(image), "mask": mask.float(), "label": sample.label,
                "has_mask": sample.has_mask, "path": sample.path, "index": index}


def _problem(job: tuple[str, str]) -> str | None:
    kind, path = job
    try:
        load_image(path) if kind == "image" else load_mask(path)
    except DatasetError as err:
        return str(err)
    return None


def check_readable(samples: list[Sample]) -> None:
    """Decode every image and mask file; raise ONE DatasetError listing all that cannot be read."""
    jobs = [("image", s.path) for s in samples if s.array is None]
    jobs += [("mask", s.mask_path) for s in samples if s.mask_path is not None]
    problems = [p for p in _read_all(_problem, jobs) if p is not None]
    if problems:
        raise DatasetError(f"{len(problems)} of {len(jobs)} files cannot be read:\n"
                           f"{format_paths(problems, limit=len(problems))}\nFix or delete them, then run again.")
