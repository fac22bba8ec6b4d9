"""One entry point to every dataset format: ``load_samples`` and ``list_categories``.

    samples = load_samples("mvtec", "data/mvtec_ad", "bottle", "test")
    samples = load_samples("folder", "my_parts", "parts", "train", normal_dirs=["ok"], abnormal_dirs=["nok"])

Formats: mvtec, btad (layouts.py), folder and mtd (folder.py), cifar10 (cifar10.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cifar10 import cifar10_classes, cifar10_samples
from .files import IMAGE_EXTENSIONS, require_dir
from .folder import folder_samples, mtd_root, mtd_samples
from .layouts import btad_samples, list_layout_categories, mvtec_samples
from .samples import DatasetError, Sample

SPLITS = ("train", "test")


@dataclass(frozen=True)
class _Format:
    load: Callable[..., list[Sample]]  # (root, category, split, **options) -> samples
    categories: Callable[[str], list[str]]  # root -> category names
    train_images: str  # where normal training images are expected, for error messages
    options: tuple[str, ...] = ()


def _folder(root: str, category: str, split: str, **options) -> list[Sample]:
    return folder_samples(root, split, **options)  # the category is only a name for the user's data


def _mtd_categories(root: str) -> list[str]:
    mtd_root(root, "magnetic_tile")
    return ["magnetic_tile"]


def _folder_categories(root: str) -> list[str]:
    return [require_dir(Path(root), "dataset root").resolve().name]


FORMATS: dict[str, _Format] = {
    "mvtec": _Format(mvtec_samples, lambda r: list_layout_categories(r, "mvtec"), "<root>/<category>/train/good/"),
    "btad": _Format(btad_samples, lambda r: list_layout_categories(r, "btad"), "<root>/<category>/train/ok/"),
    "folder": _Format(_folder, _folder_categories, "the normal_dirs folders",
                      ("normal_dirs", "abnormal_dirs", "mask_dir", "mask_suffix", "test_fraction")),
    "mtd": _Format(mtd_samples, _mtd_categories, "<root>/MT_Free/Imgs/"),
    "cifar10": _Format(cifar10_samples, cifar10_classes, "data_batch_* (images of the chosen class)"),
}


def _format(fmt: str) -> _Format:
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r}; available: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def list_categories(fmt: str, root: str) -> list[str]:
    """Category names found under ``root`` for ``fmt`` (what ``--category all`` iterates over)."""
    return _format(fmt).categories(root)


def load_samples(fmt: str, root: str, category: str, split: str, **options) -> list[Sample]:
    """Samples of one category and split, checked: ``split`` "train" holds normal images only.

    ``options`` are format-specific (folder: normal_dirs, abnormal_dirs, mask_dir, mask_suffix,
    test_fraction); options set to None count as not given. Raises DatasetError for a missing path,
    an unknown category (listing the available ones), broken image/mask pairing, or an empty split.
    """
    spec = _format(fmt)
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise DatasetError(f"format {fmt!r} does not take option(s) {', '.join(unknown)}; "
                           f"it accepts: {', '.join(spec.options) or 'none'}")
    samples = spec.load(root, category, split, **options)
    if split == "train" and not samples:
        raise DatasetError(f"no normal training images for {fmt} category {category!r} in {root}: expected "
                           f"image files ({', '.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) in "
                           f"{spec.train_images}; add defect-free images there")
    if split == "test" and not samples:
        raise DatasetError(f"no test images for {fmt} category {category!r} in {root}; the test split is empty, "
                           f"add normal and defective test images")
    return samples
