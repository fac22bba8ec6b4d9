"""Listing image files in folders: which files count as images, and the checks every format shares."""

from __future__ import annotations

from pathlib import Path

from .samples import DatasetError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
_IGNORED_NAMES = frozenset({"thumbs.db", "desktop.ini"})


def is_image_file(path: Path) -> bool:
    """True for a visible file with an accepted image extension (case-insensitive)."""
    name = path.name
    if name.startswith(".") or name.lower() in _IGNORED_NAMES:
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a folder, else raise a DatasetError that says what was expected there."""
    if not path.exists():
        raise DatasetError(f"{what} {path} does not exist; check the dataset root and category")
    if not path.is_dir():
        raise DatasetError(f"{what} {path} is a file, not a folder; check the dataset root and category")
    return path


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name; hidden files and non-images are skipped."""
    return sorted(p for p in require_dir(folder, "folder").iterdir() if is_image_file(p))


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def format_paths(paths: list[Path] | list[str], limit: int = 20) -> str:
    """One path per indented line, at most ``limit`` of them, then a count of the rest."""
    shown = [f"  {p}" for p in paths[:limit]]
    if len(paths) > limit:
        shown.append(f"  ... and {len(paths) - limit} more")
    return "\n".join(shown)
