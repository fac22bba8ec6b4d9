"""CIFAR-10 as one-class anomaly detection, read from a local ``cifar-10-batches-py`` folder (never downloaded).

The category is one class: train on that class's images of ``data_batch_*``; test on all of
``test_batch``, label 0 for that class and 1 for the nine others (the usual one-class protocol).
Samples carry the (32, 32, 3) uint8 image in ``array`` and a synthetic path ``cifar10/<split>/<index>``.
The batches are Python pickles: only load a folder you trust.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np

from .files import require_dir
from .samples import DatasetError, Sample

BATCH_FOLDER = "cifar-10-batches-py"


def cifar10_dir(root: str | Path) -> Path:
    """``root`` if it is the batches folder, else ``root/cifar-10-batches-py``."""
    root = require_dir(Path(root), "cifar10 dataset root")
    for folder in (root, root / BATCH_FOLDER):
        if (folder / "batches.meta").is_file():
            return folder
    raise DatasetError(f"no CIFAR-10 batches in {root}: expected {root}/batches.meta or "
                       f"{root}/{BATCH_FOLDER}/batches.meta (the python version of CIFAR-10, "
                       f"cifar-10-python.tar.gz, extracted); nothing is downloaded")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"CIFAR-10 file {path} is missing; re-extract cifar-10-python.tar.gz there")
    try:
        with path.open("rb") as f:
            raw = pickle.load(f, encoding="bytes")
        return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    except Exception as err:  # any unpickling failure means the same thing: a damaged file
        raise DatasetError(f"CIFAR-10 file {path} cannot be read ({err}); re-extract it") from err


def cifar10_classes(root: str | Path) -> list[str]:
    """The 10 class names, in label order, from ``batches.meta``."""
    meta = _unpickle(cifar10_dir(root) / "batches.meta")
    return [n.decode() if isinstance(n, bytes) else n for n in meta["label_names"]]


def _class_index(category: str | int, names: list[str]) -> int:
    if str(category).isdigit() and int(category) < len(names):
        return int(category)
    if category in names:
        return names.index(category)
    raise DatasetError(f"CIFAR-10 category {category!r} not found; available: {', '.join(names)} "
                       f"(or their index 0-{len(names) - 1}), or 'all'")


def _read_batches(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) of the given batch files, in order."""
    batches = [_unpickle(p) for p in paths]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def cifar10_samples(root: str | Path, category: str | int, split: str) -> list[Sample]:
    """One-class CIFAR-10 samples for ``category`` (class name or index); ``split`` "train" or "test"."""
    folder = cifar10_dir(root)
    names = cifar10_classes(folder)
    normal = _class_index(category, names)
    if split == "train":
        paths = sorted(folder.glob("data_batch_*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0))
        if not paths:
            raise DatasetError(f"no data_batch_* files in {folder}; re-extract cifar-10-python.tar.gz")
        images, labels = _read_batches(paths)
        return [Sample(f"cifar10/train/{i:06d}", 0, "good", array=images[i])
                for i in np.flatnonzero(labels == normal)]
    images, labels = _read_batches([folder / "test_batch"])
    return [Sample(f"cifar10/test/{i:06d}", int(y != normal), "good" if y == normal else names[y], array=images[i])
            for i, y in enumerate(labels)]
