"""The torch Dataset over a list of Samples, and the up-front check that every file is readable."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from ..config import augment_kind
from ..device import available_cpus
from .augment import augment_pair
from .files import format_paths
from .preprocess import Preprocess, load_image, load_mask
from .samples import DatasetError, Sample

CACHE_LIMIT = 2000  # images; 2000 x 256 x 256 x 3 bytes is about 0.4 GB of uint8
# Images decoded at once, at most (and at most the CPUs this process may use): Pillow decodes without the GIL.
# On the 2-core machine 2 threads decode bottle's training set as fast as 8 (2.3 s); in `predict` the pool
# made prediction 1.3x faster (bench/README.md, fourteenth round).
DECODE_THREADS = 8


def decode_workers(n_items: int) -> int:
    """Threads to decode ``n_items`` images with: ``DECODE_THREADS``, the CPUs and ``n_items`` bound it."""
    return max(1, min(DECODE_THREADS, available_cpus(), n_items))


def decoders(n_items: int) -> ThreadPoolExecutor:
    """A pool of ``decode_workers(n_items)`` threads, as a context manager; its ``map`` keeps the order."""
    return ThreadPoolExecutor(decode_workers(n_items), thread_name_prefix="fastflow-decode")


def _read_all(function, items: list) -> list:
    """``function`` over ``items`` in the decoding threads, results in order."""
    with decoders(len(items)) as pool:
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
                 cache: bool | None = None, decoded: DecodedImages | None = None) -> None:
        if not samples:
            raise DatasetError("AnomalyDataset got no samples; check the dataset root, category and split")
        self.samples = list(samples)
        self.preprocess = preprocess
        self.augment = augment_kind(augment)  # None, "paper" or "pose" (data/augment.py)
        self.cache = len(self.samples) <= CACHE_LIMIT if cache is None else cache
        if not self.cache:
            self._decoded = None
        elif decoded is not None:  # shared with other datasets of the same images (several trainings)
            self._decoded = decoded.of(self)
        else:
            self._decoded = _read_all(self._decode, range(len(self.samples)))

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


class DecodedImages:
    """Images decoded once and kept at input size, per preprocessing, for several trainings on the same images.

    ``fastflow train``'s automatic choice trains a short probe of each candidate preset, then the chosen one in
    full: four trainings, each of which read and decoded every image twice (the readability check, then its
    datasets): 20 s of bottle's 272 s under cProfile (bench/README.md, twenty-third round). Given to each of them
    (``train(..., decoded=d)``), one object decodes each image once per preprocessing (the candidates have two) and
    once more for the check. It holds H x W x 3 bytes per image and preprocessing (bottle at 256 px: 40 MB each) for
    as long as its owner keeps it; ``retain`` drops all preprocessings but one (the chosen preset's). Sets too large
    for a dataset's cache (``CACHE_LIMIT``) are not held."""

    def __init__(self) -> None:
        self._items: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._read: set[tuple[str, str | None]] = set()  # samples decoded without error (their files are readable)

    def of(self, dataset: AnomalyDataset) -> list[tuple[np.ndarray, np.ndarray]]:
        """``dataset``'s (image, mask) pairs at input size (``AnomalyDataset._decode``), decoding only those not
        decoded before with its preprocessing."""
        keys = [(dataset.preprocess, s.path, s.mask_path) for s in dataset.samples]
        missing = [i for i, key in enumerate(keys) if key not in self._items]
        for i, item in zip(missing, _read_all(dataset._decode, missing)):
            self._items[keys[i]] = item
            self._read.add(keys[i][1:])
        return [self._items[key] for key in keys]

    def retain(self, preprocess: Preprocess) -> None:
        """Forget the images decoded with any other preprocessing (auto.py: once the chosen preset is known)."""
        self._items = {key: item for key, item in self._items.items() if key[0] == preprocess}

    def unread(self, samples: list[Sample]) -> list[Sample]:
        """The ``samples`` whose files this object has not decoded yet (``check_readable`` needs only those)."""
        return [s for s in samples if (s.path, s.mask_path) not in self._read]


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
