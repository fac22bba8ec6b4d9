"""The user's own folders of images, and Magnetic Tile Defects (which is such a layout).

Folder format: normal images in ``normal_dirs``, defective ones in ``abnormal_dirs``. The mask of
``x.jpg`` is ``<mask_dir or x.jpg's own folder>/x<mask_suffix>``. Normal images, sorted by file name,
are split: index % k == 0 goes to test, the rest to train, with k = round(1 / test_fraction).

Magnetic Tile Defects (native layout, Huang et al.):

    <root>/MT_Free/Imgs/<name>.jpg                normal (each with an all-zero <name>.png, ignored)
    <root>/MT_<Defect>/Imgs/<name>.jpg + .png     defective image + its mask

That is the folder format with the mask beside the image (suffix ".png") and test_fraction 0.2:
the sorted MT_Free names at index % 5 == 0 are test/good, the rest train (fixed split of our README).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .files import format_paths, is_image_file, list_images, require_dir, subdirs
from .layouts import pair_masks
from .samples import DatasetError, Sample

MTD_CATEGORIES = ("magnetic_tile", "mtd", "all")  # names accepted for the one Magnetic Tile category


def _mask_of(image: Path, mask_dir: Path | None, suffix: str) -> Path:
    return (mask_dir or image.parent) / f"{image.stem}{suffix}"


def _images_without_masks(folder: Path, mask_dir: Path | None, suffix: str) -> list[Path]:
    """Images of ``folder``, leaving out the masks stored beside them (Magnetic Tile layout)."""
    images = list_images(folder)
    if mask_dir is not None:
        return images
    beside = {m for p in images if (m := _mask_of(p, None, suffix)) != p}  # masks of other images
    # e.g. "_mask.png": any file ending so is a mask. A bare extension (".png", the default) tags nothing:
    # Path(".png").suffix is "" (a hidden file's name), so compare with the extension of "x" + suffix.
    tagged = suffix.lower() != Path("x" + suffix).suffix.lower()
    return [p for p in images if p not in beside and not (tagged and p.name.endswith(suffix))]


def _defect_dirs(root: Path, abnormal_dirs: Sequence[str] | Mapping[str, str]) -> dict[str, Path]:
    """{defect_type: folder}; a list is named by folder names (full paths if those repeat)."""
    if isinstance(abnormal_dirs, str):
        abnormal_dirs = [abnormal_dirs]
    if not isinstance(abnormal_dirs, Mapping):
        names = [Path(d).name for d in abnormal_dirs]
        if len(set(names)) < len(names):
            names = [Path(d).as_posix() for d in abnormal_dirs]
        abnormal_dirs = dict(zip(names, abnormal_dirs))
    return {name: require_dir(root / d, "abnormal image folder") for name, d in abnormal_dirs.items()}


def _test_every(test_fraction: float) -> int | None:
    """k such that normals at index % k == 0 go to test; None when no normal goes to test."""
    if test_fraction == 0:
        return None
    k = round(1 / test_fraction) if 0 < test_fraction < 1 else 0
    if k < 2:
        raise DatasetError(f"test_fraction must be 0 or in (0, 0.67) so that some normal images remain "
                           f"for training, got {test_fraction!r}; the default is 0.2")
    return k


def _defect_masks(images: list[Path], mask_dir: Path | None, suffix: str, root: Path) -> dict[Path, Path]:
    """Masks of the defect images. Beside the images, masks are optional but all-or-none."""
    def candidates(image: Path) -> list[Path]:
        mask = _mask_of(image, mask_dir, suffix)
        return [] if mask == image else [mask]

    if mask_dir is None:
        if not any(m.is_file() for p in images for m in candidates(p)):
            return {}
        mask_files = []
    else:
        by_mask: dict[Path, list[Path]] = {}
        for image in images:
            by_mask.setdefault(_mask_of(image, mask_dir, suffix), []).append(image)
        shared = [f"{m} <- {', '.join(p.name for p in ps)}" for m, ps in by_mask.items() if len(ps) > 1]
        if shared:
            raise DatasetError(f"defect images from different folders share a file name, so they would share "
                               f"a mask in {mask_dir}:\n{format_paths(shared)}\nRename them so stems are unique.")
        mask_files = [m for m in mask_dir.iterdir() if is_image_file(m) and m.name.endswith(suffix)]
    expected = f"{mask_dir or '<image folder>'}/<stem>{suffix}"
    return pair_masks(images, candidates, mask_files, expected, root)


def folder_samples(root: str | Path, split: str, normal_dirs: Sequence[str] | str = (),
                   abnormal_dirs: Sequence[str] | Mapping[str, str] = (), mask_dir: str | None = None,
                   mask_suffix: str = ".png", test_fraction: float = 0.2) -> list[Sample]:
    """Samples from the user's folders (relative to ``root`` or absolute); see the module docstring."""
    root = require_dir(Path(root), "dataset root")
    if isinstance(normal_dirs, str):
        normal_dirs = [normal_dirs]
    if not normal_dirs:
        raise DatasetError(f"the folder format needs normal_dirs (folders of defect-free images, relative to "
                           f"{root} or absolute); got none")
    k = _test_every(test_fraction)
    masks = require_dir(root / mask_dir, "mask folder") if mask_dir else None
    normals = [p for d in normal_dirs
               for p in _images_without_masks(require_dir(root / d, "normal image folder"), masks, mask_suffix)]
    normals.sort(key=lambda p: (p.name, str(p)))
    in_test = [k is not None and i % k == 0 for i in range(len(normals))]
    if split == "train":
        return [Sample(str(p), 0, "good") for p, t in zip(normals, in_test) if not t]
    samples = [Sample(str(p), 0, "good") for p, t in zip(normals, in_test) if t]
    defects = [(name, p) for name, d in _defect_dirs(root, abnormal_dirs).items()
               for p in _images_without_masks(d, masks, mask_suffix)]
    pairs = _defect_masks([p for _, p in defects], masks, mask_suffix, root)
    for name, image in defects:
        mask = pairs.get(image)
        samples.append(Sample(str(image), 1, name, str(mask) if mask else None))
    return samples


def mtd_root(root: str | Path, category: str) -> Path:
    """The folder holding MT_Free/ and MT_<Defect>/: ``root`` itself or ``root/category``."""
    if category.lower() not in MTD_CATEGORIES:
        raise DatasetError(f"Magnetic Tile has one category; got {category!r}, use one of {', '.join(MTD_CATEGORIES)}")
    root = require_dir(Path(root), "mtd dataset root")
    for base in (root, root / category, root / "magnetic_tile"):
        if (base / "MT_Free").is_dir():
            return base
    raise DatasetError(f"no MT_Free folder in {root}: the mtd format expects the native Magnetic Tile layout "
                       f"<root>/MT_Free/Imgs/*.jpg and <root>/MT_<Defect>/Imgs/*.jpg; pass the folder that holds "
                       f"MT_Free (or use --format folder for another layout)")


def mtd_samples(root: str | Path, category: str, split: str) -> list[Sample]:
    """Magnetic Tile Defects with the fixed split (sorted MT_Free names, index % 5 == 0 is test)."""
    base = mtd_root(root, category)
    defects = {d.name[len("MT_"):]: f"{d.name}/Imgs" for d in subdirs(base)
               if d.name.startswith("MT_") and d.name != "MT_Free"}
    return folder_samples(base, split, normal_dirs=["MT_Free/Imgs"], abnormal_dirs=defects,
                          mask_suffix=".png", test_fraction=0.2)
