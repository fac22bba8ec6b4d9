"""Benchmark layouts with a ground-truth folder: MVTec AD and BTAD.

    MVTec AD: <root>/<category>/train/good/*            normal training images
              <root>/<category>/test/<defect>/*          "good" is normal, any other folder a defect
              <root>/<category>/ground_truth/<defect>/<stem>_mask.png
    BTAD:     <root>/<01|02|03>/train/ok/*, test/ok/*, test/ko/*
              <root>/<01|02|03>/ground_truth/ko/<stem>.png (or .bmp)

Masks are optional per category: without a ``ground_truth`` folder anomalies get ``mask_path=None``
(image-level metrics only). With one, every defect image needs its mask and every mask its image.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .files import format_paths, is_image_file, list_images, require_dir, subdirs
from .samples import DatasetError, Sample


def list_layout_categories(root: str | Path, fmt: str) -> list[str]:
    """Sub-folders of ``root`` that hold a ``train`` folder, sorted."""
    root = require_dir(Path(root), f"{fmt} dataset root")
    found = [d.name for d in subdirs(root) if (d / "train").is_dir()]
    if not found:
        raise DatasetError(
            f"no {fmt} categories in {root}: expected folders like {root}/<category>/train/; "
            f"check that the root is the folder that contains the category folders")
    return found


def category_dir(root: str | Path, category: str, fmt: str) -> Path:
    """The folder of ``category`` under ``root``; ``root`` may also be the category folder itself."""
    root = require_dir(Path(root), f"{fmt} dataset root")
    for name in (category, category.zfill(2)):  # BTAD categories are "01".."03"; accept "1"
        if (root / name).is_dir():
            return root / name
    if root.name == category and (root / "train").is_dir():
        return root
    available = ", ".join(list_layout_categories(root, fmt))
    raise DatasetError(f"category {category!r} not found in {root}; available: {available}. "
                       f"Pass one of these, or 'all' for every category")


def pair_masks(images: list[Path], candidates: Callable[[Path], list[Path]],
               mask_files: list[Path], expected: str, where: Path) -> dict[Path, Path]:
    """Map each defect image to its mask; raise one DatasetError for missing and orphan masks.

    ``candidates(image)`` gives the accepted mask paths of an image (the first existing one wins);
    ``mask_files`` are all files in the ground-truth folders, to find masks that have no image.
    """
    pairs, missing = {}, []
    for image in images:
        found = [m for m in candidates(image) if m.is_file()]
        if found:
            pairs[image] = found[0]
        else:
            missing.append(image)
    orphans = sorted(set(mask_files) - set(pairs.values()))
    problems = []
    if missing:
        problems.append(f"{len(missing)} defect image(s) have no mask (expected {expected}):\n"
                        f"{format_paths(missing)}\nAdd the missing masks, or remove the ground-truth "
                        f"folder to evaluate image-level metrics only.")
    if orphans:
        problems.append(f"{len(orphans)} mask(s) have no matching defect image:\n{format_paths(orphans)}\n"
                        f"Restore their images, or delete these masks.")
    if problems:
        raise DatasetError(f"mask pairing failed in {where}:\n" + "\n".join(problems))
    return pairs


def mvtec_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """Samples of one MVTec AD category; ``split`` is "train" (normals only) or "test"."""
    cat = category_dir(root, category, "mvtec")
    if split == "train":
        train = require_dir(cat / "train" / "good", "MVTec training folder")
        return [Sample(str(p), 0, "good") for p in list_images(train)]
    test = require_dir(cat / "test", "MVTec test folder")
    samples, defects = [], []
    for folder in subdirs(test):
        for image in list_images(folder):
            if folder.name == "good":
                samples.append(Sample(str(image), 0, "good"))
            else:
                defects.append(image)
    gt = cat / "ground_truth"
    pairs = {}
    if gt.is_dir():
        masks = [m for d in subdirs(gt) if d.name != "good" for m in list_images(d)]
        pairs = pair_masks(defects, lambda p: [gt / p.parent.name / f"{p.stem}_mask.png"], masks,
                           "ground_truth/<defect>/<stem>_mask.png", cat)
    for image in defects:
        mask = pairs.get(image)
        samples.append(Sample(str(image), 1, image.parent.name, str(mask) if mask else None))
    return samples


def btad_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """Samples of one BTAD product ("01", "02", "03"); ``split`` is "train" or "test"."""
    cat = category_dir(root, category, "btad")
    if split == "train":
        train = require_dir(cat / "train" / "ok", "BTAD training folder")
        return [Sample(str(p), 0, "good") for p in list_images(train)]
    samples = [Sample(str(p), 0, "good") for p in list_images(require_dir(cat / "test" / "ok", "BTAD test folder"))]
    defects = list_images(require_dir(cat / "test" / "ko", "BTAD test folder"))
    gt = cat / "ground_truth" / "ko"
    pairs = {}
    if gt.is_dir():
        masks = [m for m in gt.iterdir() if is_image_file(m)]
        pairs = pair_masks(defects, lambda p: [gt / f"{p.stem}.png", gt / f"{p.stem}.bmp"], masks,
                           "ground_truth/ko/<stem>.png or .bmp", cat)
    for image in defects:
        mask = pairs.get(image)
        samples.append(Sample(str(image), 1, "ko", str(mask) if mask else None))
    return samples
