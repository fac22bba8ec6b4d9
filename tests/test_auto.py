"""Synthetic defects, the training-length rule and the automatic choice of a configuration (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest

from fastflow.config import TrainConfig
from fastflow.data.synthetic import KINDS, add_defect, defect_set
from fastflow.train import planned_epochs


def _texture(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 190, size=(size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(base + rng.integers(-10, 11, size=base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", KINDS)
def test_defect_mask_is_exactly_the_changed_pixels(kind):
    image = _texture(0)
    for seed in range(5):
        bad, mask = add_defect(image, np.random.default_rng(seed), kind)
        assert bad.shape == image.shape and bad.dtype == np.uint8 and mask.shape == image.shape[:2]
        changed = (bad != image).any(axis=2)
        np.testing.assert_array_equal(mask, changed)  # every changed pixel is in the mask and nothing else
        assert 4 <= mask.sum() < 0.5 * mask.size  # a defect, not the whole image
        assert not np.shares_memory(bad, image)


@pytest.mark.parametrize("kind", KINDS)
def test_grey_images_get_grey_defects(kind):
    grey = _texture(2)[..., :1].repeat(3, axis=2)
    for seed in range(3):
        bad, _ = add_defect(grey, np.random.default_rng(seed), kind)
        assert (bad[..., 0] == bad[..., 1]).all() and (bad[..., 1] == bad[..., 2]).all()


def test_defects_are_deterministic_by_seed_and_differ_between_seeds():
    images = [_texture(i) for i in range(4)]
    a_imgs, a_masks, a_kinds = defect_set(images, seed=3, per_image=2)
    b_imgs, b_masks, b_kinds = defect_set(images, seed=3, per_image=2)
    c_imgs, _, _ = defect_set(images, seed=4, per_image=2)
    assert a_kinds == b_kinds and sorted(set(a_kinds)) == sorted(KINDS)  # every kind, in turn
    for x, y, m, n in zip(a_imgs, b_imgs, a_masks, b_masks):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(m, n)
    assert any(not np.array_equal(x, z) for x, z in zip(a_imgs, c_imgs))
    head, _, _ = defect_set(images[:3], seed=3, per_image=2)  # images added at the end change nothing before
    for x, y in zip(head, a_imgs):
        np.testing.assert_array_equal(x, y)


def test_defect_sizes_scale_with_the_image():
    small, large = _texture(1, 64), np.repeat(np.repeat(_texture(1, 64), 4, 0), 4, 1)
    for kind in ("spot", "cutpaste"):
        _, m_small = add_defect(small, np.random.default_rng(7), kind)
        _, m_large = add_defect(large, np.random.default_rng(7), kind)
        ratio = m_large.sum() / m_small.sum()
        assert 6 < ratio < 26, (kind, ratio)  # about 16x the pixels at 4x the side


def test_add_defect_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        add_defect(np.zeros((32, 32, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown defect kind"):
        add_defect(_texture(0), np.random.default_rng(0), "dent")


@pytest.mark.parametrize("n_fit, batch, steps, max_epochs, expected", [
    (188, 8, None, 20, 20),       # no budget: the epoch count
    (188, 8, 1000, 200, 42),      # 24 steps an epoch -> ceil(1000 / 24)
    (40, 8, 1000, 200, 200),      # 5 steps an epoch: capped by epochs
    (684, 8, 1000, 200, 12),      # 86 steps an epoch
    (3, 8, 10, 200, 10),          # a single partial batch is one step
])
def test_planned_epochs_reaches_the_step_budget(n_fit, batch, steps, max_epochs, expected):
    cfg = TrainConfig(epochs=max_epochs, batch_size=batch, steps=steps)
    epochs = planned_epochs(cfg, n_fit)
    assert epochs == expected
    per_epoch = -(-n_fit // batch)
    if steps is not None and epochs < max_epochs:
        assert (epochs - 1) * per_epoch < steps <= epochs * per_epoch  # the fewest epochs that reach it


def test_step_budget_validation():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        TrainConfig(steps=0)


# -- the automatic choice ---------------------------------------------------------------------------
def _write_set(root, name: str, images: list[np.ndarray]) -> str:
    from PIL import Image

    folder = root / name / "train" / "good"
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    return str(root)


SIZE = 64


def _aligned_images(n: int, rng) -> list[np.ndarray]:
    """The same object at the same place in every image (a photograph, 64 px), with sensor noise."""
    from PIL import Image
    from skimage.data import coffee

    base = np.asarray(Image.fromarray(coffee()).resize((SIZE, SIZE), Image.Resampling.BILINEAR)).astype(np.int16)
    return [np.clip(base + rng.integers(-4, 5, size=base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


def _unaligned_images(n: int, rng) -> list[np.ndarray]:
    """A surface seen at random places, turns and exposures (bright to dark), 64 px."""
    from skimage.data import brick

    tex = brick()
    out = []
    for _ in range(n):
        y, x = rng.integers(0, tex.shape[0] - 96, size=2)
        crop = np.rot90(tex[y:y + 96:1, x:x + 96], int(rng.integers(4)))[::3, ::3][:32].repeat(2, 0).repeat(2, 1)
        crop = crop.astype(np.float64) * rng.uniform(0.35, 1.0) + rng.uniform(-20, 20)
        out.append(np.repeat(np.clip(crop, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
    return out


@pytest.mark.parametrize("kind, expected", [("aligned", "efficientnet_lite0"), ("unaligned", "lite0_unaligned")])
def test_auto_choice_picks_the_configuration_each_set_needs(tmp_path, kind, expected):
    """Two tiny sets built to need different configurations: one object always in the same place (the
    aligned recipe's per-location model localises what the stride-32 unaligned one cannot), and a surface
    at random places and exposures (the unaligned recipe's contrast stretch and position-free model)."""
    from fastflow.auto import candidate_configs, choose
    from fastflow.data import load_samples

    rng = np.random.default_rng(0)
    images = _aligned_images(24, rng) if kind == "aligned" else _unaligned_images(24, rng)
    root = _write_set(tmp_path / "data", kind, images)
    samples = load_samples("mvtec", root, kind, "train")
    candidates = candidate_configs({"input_size": (64, 64)}, {"epochs": 8, "steps": None, "batch_size": 4,
                                                              "val_fraction": 0.25})
    logged = []
    name, model_cfg, train_cfg, report = choose(candidates, samples, str(tmp_path / "run"), log=logged.append)
    assert name == expected, report
    assert report["chosen"] == expected and set(report["candidates"]) == {"efficientnet_lite0", "lite0_unaligned"}
    assert model_cfg == dict((n, m) for n, m, _ in candidates)[expected]
    assert any(line.startswith(f"auto: chose {expected}") for line in logged)
    assert not list((tmp_path / "run").glob(".auto-probe*"))  # probes cleaned up
