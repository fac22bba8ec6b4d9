"""Twenty-eighth round. An MVTec-layout copy (symbolic links) of a dataset whose training split keeps only N images,
evenly spread in load order (the same N that r27/choice_draws.py --n-train keeps); the test split and its masks are
all linked unchanged. Usage (repository root):
    PYTHONPATH=src python bench/results/r28/subset.py FMT ROOT CAT N OUT_ROOT OUT_CAT
"""
import sys
from pathlib import Path

import numpy as np

from fastflow.data import load_samples


def main():
    fmt, root, cat, n, out_root, out_cat = sys.argv[1:7]
    out = Path(out_root) / out_cat
    train = load_samples(fmt, root, cat, "train")
    keep = [train[i] for i in np.linspace(0, len(train) - 1, int(n)).round().astype(int)]
    for i, s in enumerate(keep):
        _link(s.path, out / "train" / "good" / f"{i:03d}{Path(s.path).suffix.lower()}")
    for i, s in enumerate(load_samples(fmt, root, cat, "test")):
        kind = "good" if s.label == 0 else (s.defect_type or "defect")
        name = f"{i:04d}"
        _link(s.path, out / "test" / kind / f"{name}{Path(s.path).suffix.lower()}")
        if s.mask_path:
            _link(s.mask_path, out / "ground_truth" / kind / f"{name}_mask.png")
    print(f"{out}: {len(keep)} of {len(train)} training images")


def _link(src: str, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(Path(src).resolve())


if __name__ == "__main__":
    main()
