"""Pictures shared by predict, report and invert; the atomic file writes of checkpoints and summaries."""

import os

import numpy as np
import torch

from fastflow.checkpoint import atomic_write
from fastflow.visualize import colorize, denormalize, heat_overlay, mask_overlay, overlay


def test_mask_outline_is_the_inner_boundary_of_the_mask():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    out = mask_overlay(np.zeros((8, 8, 3), np.uint8), mask)
    red = (out == [255, 0, 0]).all(axis=-1)
    ring = mask.copy()
    ring[3:5, 3:5] = False  # a 4x4 square's inner boundary: its 12 border pixels
    assert np.array_equal(red, ring)
    assert (out[3:5, 3:5] == [102, 0, 0]).all() and (out[~mask] == 0).all()  # tint inside, untouched outside


def test_colorize_and_overlay_on_hand_values():
    amap = np.array([[0.0, 1.0], [2.0, 5.0]])
    heat = colorize(amap, 1.0, 2.0)  # clipped to [1, 2]: jet's ends
    assert heat.dtype == np.uint8 and heat.shape == (2, 2, 3)
    assert np.array_equal(heat[0, 0], heat[0, 1]) and np.array_equal(heat[1, 0], heat[1, 1])
    assert heat[0, 0, 2] > 100 and heat[0, 0, 0] == 0 and heat[1, 1, 0] > 100 and heat[1, 1, 2] == 0
    rgb = np.full((2, 2, 3), 100, np.uint8)
    assert np.array_equal(overlay(rgb, np.full((2, 2, 3), 200, np.uint8)), np.full((2, 2, 3), 150))
    assert np.array_equal(heat_overlay(rgb, amap, 1.0, 2.0, max_alpha=0.5)[1], overlay(rgb, heat)[1])  # at high


def test_heat_overlay_leaves_the_part_visible_where_the_map_is_low():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    amap = np.array([[0.0, 1.0, 1.5, 2.0]] * 3 + [[9.0, np.nan, 1.25, 0.5]])
    out = heat_overlay(rgb, amap, 1.0, 2.0, max_alpha=0.6).astype(float)
    heat = colorize(amap, 1.0, 2.0).astype(float)
    assert np.array_equal(out[:, 0][:3], rgb[:3, 0]) and np.array_equal(out[:3, 1], rgb[:3, 1])  # at or below low
    for (y, x), alpha in {(0, 2): 0.3, (0, 3): 0.6, (3, 0): 0.6, (3, 1): 0.6, (3, 2): 0.15}.items():
        assert np.allclose(out[y, x], rgb[y, x] * (1 - alpha) + heat[y, x] * alpha, atol=0.51), (y, x)


def test_mask_outline_equals_scikit_images_inner_boundary():
    from scipy import ndimage
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(0)
    for _ in range(20):  # blobs of every shape, touching the image border too
        mask = ndimage.binary_opening(rng.random((24, 31)) > 0.45)
        rgb = np.zeros((24, 31, 3), np.uint8)
        red = (mask_overlay(rgb, mask) == [255, 0, 0]).all(axis=-1)
        assert np.array_equal(red, find_boundaries(mask, mode="inner"))


def test_denormalize_inverts_the_normalisation():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(mean).view(3, 1, 1)) \
        / torch.tensor(std).view(3, 1, 1)
    assert np.array_equal(denormalize(x, mean, std), rgb)


def test_atomic_write_replaces_the_file_and_syncs_it(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "summary.json"
    path.write_text("old")
    atomic_write(str(path), lambda f: f.write("new"))
    assert path.read_text() == "new" and len(synced) == 1
    assert os.listdir(tmp_path) == ["summary.json"]  # no temporary file left

    def fail(f):
        f.write("half")
        raise OSError("disk full")

    try:
        atomic_write(str(path), fail)
    except OSError:
        pass
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["summary.json"]
