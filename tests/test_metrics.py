"""Tests of fastflow.metrics: hand-worked cases, scikit-learn parity, and an independent slow AUPRO."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import f1_score, roc_auc_score

from fastflow.metrics import (evaluate_arrays, image_auroc, image_f1_max, pixel_aupro, pixel_auroc,
                              pro_curve, threshold_at_fpr)

# Two 2x2 images. Image 0 has one diagonal region {0.9, 0.5}: a single region in 8-connectivity
# (the official rule), two in 4-connectivity. Image 1 has a one-pixel region {0.8}.
# Normal pixels: 0.6, 0.1 (image 0) and 0.5, 0.3, 0.2 (image 1), 5 in all.
#   threshold  FPR  PRO = mean(fraction of region 0, fraction of region 1)
#   0.9        0    (1/2 + 0) / 2 = 0.25
#   0.8        0    (1/2 + 1) / 2 = 0.75
#   0.6        0.2  0.75
#   0.5        0.4  1        (the normal 0.5 and the region pixel 0.5 tie: a sloped segment)
#   0.3..0.1   0.6, 0.8, 1   1
# Up to FPR 1: 0.2 * 0.75 + 0.2 * (0.75 + 1) / 2 + 0.6 * 1 = 0.925.
# Up to FPR 0.3: PRO interpolated at 0.3 is 0.875, area 0.15 + 0.1 * (0.75 + 0.875) / 2 = 0.23125,
# normalised: 0.23125 / 0.3 = 37/48. (4-connectivity would give 0.2 * 2/3 + 0.1 * 0.75 = 0.2083.)
HAND_MAPS = np.array([[[0.9, 0.6], [0.1, 0.5]], [[0.5, 0.3], [0.2, 0.8]]])
HAND_MASKS = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 1]]], dtype=bool)


def test_pro_curve_hand_example():
    fpr, pro = pro_curve(HAND_MAPS, HAND_MASKS)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 1, 1, 1, 1, 1], atol=1e-12)


def test_pro_curve_up_to_max_fpr_is_the_full_curves_start():
    """With max_fpr the curve is the full one up to and including its first point beyond max_fpr (only the
    pixels scoring that high are sorted): the hand example at 0.3 stops at (0.4, 1); on random tied maps the
    prefix matches (FPR exactly, PRO to float rounding), for limits that fall inside a tied group and between groups."""
    fpr, pro = pro_curve(HAND_MAPS, HAND_MASKS, max_fpr=0.3)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.4], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 1], atol=1e-12)
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 24, 24), bool)
    masks[0, 3:9, 4:7] = masks[2, 10:12, 10:20] = masks[5, 0:4, 0:4] = True
    maps = np.round(ndimage.gaussian_filter(rng.normal(size=masks.shape), (0, 1, 1)) + masks, 1)  # many ties
    full_fpr, full_pro = pro_curve(maps, masks)
    for limit in (0.01, 0.05, 0.3, 0.9):
        fpr, pro = pro_curve(maps, masks, max_fpr=limit)
        n = len(fpr)
        assert fpr[-1] > limit >= fpr[-2] and n < len(full_fpr)
        np.testing.assert_array_equal(fpr, full_fpr[:n])
        np.testing.assert_allclose(pro, full_pro[:n], rtol=1e-12)  # tied pixels summed in another order
    assert len(pro_curve(maps, masks, max_fpr=1.0)[0]) == len(full_fpr)  # nothing beyond 1: the whole curve


def test_aupro_hand_example():
    assert pixel_aupro(HAND_MAPS, HAND_MASKS, fpr_limit=1.0) == pytest.approx(0.925, abs=1e-12)
    assert pixel_aupro(HAND_MAPS, HAND_MASKS) == pytest.approx(37 / 48, abs=1e-12)


def test_image_metrics_hand_example():
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    # Pairs (anomalous, normal) ranked correctly: (0.35, 0.1), (0.8, 0.1), (0.8, 0.4) -> 3/4.
    assert image_auroc(scores, labels) == pytest.approx(0.75)
    # score >= 0.35 flags {0.35, 0.4, 0.8}: precision 2/3, recall 1, F1 = 0.8 (the best).
    f1, threshold = image_f1_max(scores, labels)
    assert (f1, threshold) == (pytest.approx(0.8), 0.35)


def _random_set(rng, n=4, size=32, continuous=True):
    """Masks with several irregular regions per image, and noisy maps correlated with them."""
    blobs = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    masks = blobs > np.quantile(blobs, 0.85)
    masks[0] = False                                          # one fully normal image
    maps = 0.8 * masks + rng.normal(size=masks.shape)
    if not continuous:                                        # 64 levels: many ties
        maps = np.round(maps * 8) / 8
    return maps, masks


def _reference_aupro(maps, masks, thresholds, fpr_limit=0.3):
    """Slow, straightforward AUPRO: one full pass over the images per threshold."""
    regions = []                                              # (image index, region mask)
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    points = [(0.0, 0.0), (1.0, 1.0)]
    for t in thresholds:
        predicted = maps >= t
        fpr = (predicted & ~masks).sum() / (~masks).sum()
        pro = np.mean([predicted[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    points.sort()
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1, x1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0), fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit, np.array(points)


def test_aupro_matches_reference_exactly_on_tied_scores():
    # With every distinct score in the grid, both compute the very same curve: only rounding differs.
    maps, masks = _random_set(np.random.default_rng(0), continuous=False)
    expected, _ = _reference_aupro(maps, masks, np.unique(maps))
    assert pixel_aupro(maps, masks) == pytest.approx(expected, abs=1e-12)
    # Same curve when the evenly spaced grid of num_thresholds is exactly the set of levels.
    levels = np.linspace(-3.0, 4.0, 57)
    tied = levels[np.searchsorted(levels, np.clip(maps, -3, 4))]
    tied.flat[:2] = levels[[0, -1]]                           # span the whole grid
    expected, _ = _reference_aupro(tied, masks, levels)
    assert pixel_aupro(tied, masks, num_thresholds=57) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_fine_grid_reference(fpr_limit):
    # Tolerance: between two consecutive grid thresholds a and b both curves are monotone, so both
    # lie in the box [FPR_a, FPR_b] x [PRO_a, PRO_b] (also when cut at fpr_limit). Their areas
    # thus differ by at most sum(dFPR * dPRO) over the boxes below fpr_limit, divided by fpr_limit
    # once normalised. A grid of 2001 quantiles of the normal pixels (plus the top score, so the
    # first box starts at (0, 0)) keeps this bound <= 2.2e-3 here, and the test asserts it is small.
    maps, masks = _random_set(np.random.default_rng(1))
    grid = np.append(np.quantile(maps[~masks], np.linspace(0, 1, 2001)), maps.max())
    expected, points = _reference_aupro(maps, masks, grid, fpr_limit)
    d_fpr, d_pro = np.diff(points, axis=0).T
    tolerance = np.sum((d_fpr * d_pro)[points[:-1, 0] < fpr_limit]) / fpr_limit
    assert tolerance < 5e-3
    assert pixel_aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=tolerance)


def test_perfect_and_reversed_maps():
    rng = np.random.default_rng(2)
    _, masks = _random_set(rng)
    perfect = masks + rng.uniform(0, 0.9, size=masks.shape)  # every anomalous pixel above all normal
    assert pixel_aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_auroc(perfect, masks) == 1.0
    assert pixel_aupro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(-perfect, masks) == 0.0


def test_pixel_auroc_matches_sklearn():
    maps, masks = _random_set(np.random.default_rng(3))
    maps = maps.astype(np.float32)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()),
                                                     abs=1e-12)


def test_invariance_to_monotone_transforms():
    rng = np.random.default_rng(4)
    maps, masks = _random_set(rng)
    scores, labels = rng.normal(size=50), rng.integers(0, 2, size=50)
    for transform in (np.exp, lambda x: 3 * np.arctan(x) + 1):
        assert pixel_aupro(transform(maps), masks) == pytest.approx(pixel_aupro(maps, masks),
                                                                    abs=1e-12)
        assert pixel_auroc(transform(maps), masks) == pytest.approx(pixel_auroc(maps, masks),
                                                                    abs=1e-12)
        assert image_auroc(transform(scores), labels) == pytest.approx(image_auroc(scores, labels),
                                                                       abs=1e-12)


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(5)
    scores, labels = np.round(rng.normal(size=80), 1), rng.integers(0, 2, size=80)
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    f1, threshold = image_f1_max(scores, labels)
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(f1, abs=1e-12)


def test_threshold_at_fpr_rule():
    normal = np.random.default_rng(6).permutation(np.arange(1.0, 101.0))   # 1 .. 100
    assert threshold_at_fpr(normal, 0.05) == 95.0            # 96..100 above: exactly 5%
    assert threshold_at_fpr(normal, 0.055) == 95.0           # 5.5 scores allowed -> 5
    assert threshold_at_fpr(normal, 0.29) == 71.0            # 0.29 * 100 = 28.999...96 still 29
    assert threshold_at_fpr(normal, 0.0) == 100.0
    assert threshold_at_fpr(normal, 1.0) == 1.0
    assert threshold_at_fpr([1.0, 2.0, 2.0, 2.0, 3.0], 0.4) == 2.0        # ties: only 3 above
    scores = np.random.default_rng(7).normal(size=997)
    for fpr in (0.01, 0.1, 0.37):
        t = threshold_at_fpr(scores, fpr)
        assert np.mean(scores > t) <= fpr                       # at most fpr above ...
        assert np.mean(scores >= t) > fpr                       # ... and no higher threshold in data
        assert t == np.quantile(scores, 1 - np.floor(fpr * 997) / 997, method="inverted_cdf")
    with pytest.raises(ValueError, match="fpr"):
        threshold_at_fpr(scores, 1.5)


def test_single_class_gives_nan():
    with pytest.warns(RuntimeWarning, match="only normal"):
        assert np.isnan(image_auroc([0.1, 0.2], [0, 0]))
    with pytest.warns(RuntimeWarning, match="only anomalous"):
        assert np.isnan(image_auroc([0.1, 0.2], [1, 1]))
    with pytest.warns(RuntimeWarning):
        assert np.isnan(pixel_aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4), dtype=bool)))


def test_evaluate_arrays():
    rng = np.random.default_rng(8)
    maps, masks = _random_set(rng, n=6)
    labels = masks.any(axis=(1, 2)).astype(int)              # image 0 normal, 1..5 anomalous
    scores = maps.max(axis=(1, 2))
    no_pixels = evaluate_arrays(scores, labels)
    assert no_pixels["pixel_auroc"] is None and no_pixels["pixel_aupro"] is None
    assert no_pixels["n_masked"] == 0
    assert (no_pixels["n_images"], no_pixels["n_normal"], no_pixels["n_anomalous"]) == (6, 1, 5)
    assert no_pixels["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert (no_pixels["image_f1_max"], no_pixels["image_f1_threshold"]) == image_f1_max(scores, labels)
    none_masked = evaluate_arrays(scores, labels, maps, masks, has_mask=[True] * 1 + [False] * 5)
    assert none_masked["pixel_aupro"] is None and none_masked["n_masked"] == 0

    # Images 2 and 4 lack a mask; the normal image's stored mask is garbage and must be ignored.
    has_mask = np.array([False, True, False, True, False, True])
    garbage = masks.copy()
    garbage[0, :3, :3] = True
    report = evaluate_arrays(scores, labels, maps, garbage, has_mask)
    used = [0, 1, 3, 5]
    assert report["n_masked"] == 4
    assert report["pixel_auroc"] == pytest.approx(pixel_auroc(maps[used], masks[used]))
    assert report["pixel_aupro"] == pytest.approx(pixel_aupro(maps[used], masks[used]))


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match=r"\(2, 2, 2\).*\(2, 2\)"):
        pixel_auroc(np.zeros((2, 2, 2)), np.zeros((2, 2)))
