"""Anomaly detection metrics, following the MVTec AD evaluation protocol.

Image level: AUROC and the best F1 over all thresholds. Pixel level: AUROC over all pixels, and
AUPRO, the area under the per-region-overlap curve up to a false-positive rate of 30%, normalised
to [0, 1]. AUPRO follows `compute_pro` and `trapezoid` of the official MVTec AD evaluation code
(`generic_util.py` / `pro_curve_util.py`): every distinct score is a threshold, ground-truth regions
are 8-connected components, and the curve is interpolated at the limit. Everything takes NumPy
arrays (or anything `np.asarray` accepts); `evaluate_arrays` computes the whole report at once.

A one-class score set has no AUROC: those functions warn with the reason and return NaN.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score

# Regions are connected in 8-connectivity within one image, never across images (as in the
# official code, which labels each image with a 3x3 all-ones structure).
_EIGHT_CONNECTED_PER_IMAGE = np.zeros((3, 3, 3), dtype=bool)
_EIGHT_CONNECTED_PER_IMAGE[1] = True


def _nan(reason: str) -> float:
    warnings.warn(f"{reason}; returning NaN", RuntimeWarning, stacklevel=3)
    return float("nan")


def _maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps and masks must both be (N, H, W) with equal shapes, got maps "
                         f"{maps.shape} and masks {masks.shape}; stack per-image maps with np.stack")
    if masks.dtype != bool and not np.isin(masks, (0, 1)).all():
        raise ValueError("masks must be boolean or 0/1; binarise ground-truth images with mask > 0")
    return maps, masks.astype(bool, copy=False)


def image_auroc(scores, labels) -> float:
    """Area under the ROC curve of image scores.

    scores: (N,) anomaly scores, higher = more anomalous. labels: (N,) 1 = anomalous, 0 = normal.
    Returns NaN (with a warning) when only one class is present.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    if labels.all() or not labels.any():
        return _nan(f"AUROC needs normal and anomalous samples, got only "
                    f"{'anomalous' if labels.any() else 'normal'} ones ({labels.size})")
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def pixel_auroc(maps, masks) -> float:
    """Area under the ROC curve of all pixels of all images pooled together.

    maps: (N, H, W) anomaly maps, float32 recommended (kept as given, not upcast: N=100 images at
    256x256 is 6.5M pixels). masks: (N, H, W) bool or 0/1 ground truth.
    Returns NaN (with a warning) when all pixels are of one class.
    """
    maps, masks = _maps_and_masks(maps, masks)
    return image_auroc(maps.ravel(), masks.ravel())


def pro_curve(maps, masks, num_thresholds: int | None = None, max_fpr: float | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve, as `compute_pro` of the official MVTec AD code.

    maps: (N, H, W) anomaly maps. masks: (N, H, W) bool or 0/1 ground truth, at least one anomalous
    and one normal pixel. A pixel is predicted anomalous at threshold t when its score is >= t.
    For each threshold: FPR = fraction of normal pixels predicted anomalous; PRO = mean over all
    ground-truth regions of all images (8-connected components) of the fraction of the region
    predicted anomalous.
    num_thresholds: None (default, exact) uses every distinct score as a threshold; an int uses that
    many thresholds evenly spaced between the smallest and largest score (an approximation).
    max_fpr (exact thresholds only): the curve stops at its first point whose FPR exceeds it, and only the
    pixels scoring at least that point's threshold are sorted (AUPRO to 30% sorts about a third of them).
    Returns (fpr, pro), FPR non-decreasing, starting at (0, 0) and, without max_fpr, ending at (1, 1).
    """
    maps, masks = _maps_and_masks(maps, masks)
    regions, n_regions = ndimage.label(masks, structure=_EIGHT_CONNECTED_PER_IMAGE)
    n_normal = masks.size - np.count_nonzero(masks)
    if n_regions == 0 or n_normal == 0:
        raise ValueError(f"the PRO curve needs anomalous and normal pixels, got {n_regions} regions "
                         f"and {n_normal} normal pixels")
    if max_fpr is not None and num_thresholds is not None:
        raise ValueError("max_fpr needs the exact curve (num_thresholds=None)")
    regions, scores = regions.ravel(), maps.ravel()
    # Each region pixel weighs 1 / region size, so a fully detected region adds 1 to the PRO sum.
    inverse_size = 1.0 / np.maximum(np.bincount(regions), 1)
    inverse_size[0] = 0.0
    top = _top_pixels(scores, masks.ravel(), n_normal, max_fpr)
    if top is not None:
        regions, scores = regions[top], scores[top]

    order = np.argsort(scores)[::-1]                       # descending scores
    sorted_scores = scores[order]
    fp = np.cumsum(regions[order] == 0)                    # normal pixels among the top k + 1
    overlap = np.cumsum(inverse_size[regions[order]])      # summed region fractions in the top k + 1
    del order
    if num_thresholds is None:                             # last pixel of each group of tied scores
        last = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    else:
        thresholds = np.linspace(sorted_scores[-1], sorted_scores[0], num_thresholds)
        last = np.searchsorted(-sorted_scores, -thresholds, side="right") - 1
    fpr = np.minimum(fp[last] / n_normal, 1.0)
    pro = np.minimum(overlap[last] / n_regions, 1.0)
    if num_thresholds is not None:
        fpr, pro = fpr[::-1], pro[::-1]
    if top is None:  # the whole curve: it ends at (1, 1)
        fpr, pro = np.append(fpr, 1.0), np.append(pro, 1.0)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def _top_pixels(scores: np.ndarray, anomalous: np.ndarray, n_normal: int, max_fpr: float | None) -> np.ndarray | None:
    """Indices of the pixels scoring at least the K-th highest normal score, K = floor(max_fpr * n_normal) + 1:
    every threshold group up to and including the first whose FPR exceeds ``max_fpr`` (fp >= K > max_fpr *
    n_normal), complete. None (all pixels) without max_fpr, when K exceeds the normal pixels, or with NaN scores."""
    if max_fpr is None:
        return None
    k = int(np.floor(max_fpr * n_normal)) + 1
    if k > n_normal or np.isnan(scores).any():
        return None
    normal = scores[~anomalous]
    kth = np.partition(normal, n_normal - k)[n_normal - k]
    return np.flatnonzero(scores >= kth)


def pixel_aupro(maps, masks, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (so in [0, 1]).

    maps: (N, H, W) anomaly maps. masks: (N, H, W) bool or 0/1 ground truth. The curve of
    `pro_curve` is linearly interpolated at `fpr_limit` and integrated with the trapezoid rule, as
    in the official MVTec AD code. Returns NaN (with a warning) without anomalous or normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}; MVTec AD uses 0.3")
    maps, masks = _maps_and_masks(maps, masks)
    if masks.all() or not masks.any():
        return _nan("AUPRO needs anomalous and normal pixels, got only "
                    f"{'anomalous' if masks.any() else 'normal'} ones")
    fpr, pro = pro_curve(maps, masks, num_thresholds, fpr_limit if num_thresholds is None else None)
    end = np.searchsorted(fpr, fpr_limit, side="right")   # points with fpr <= fpr_limit
    x, y = fpr[:end], pro[:end]
    if x[-1] < fpr_limit:                                  # then fpr[end] > fpr_limit > fpr[end - 1]
        slope = (pro[end] - pro[end - 1]) / (fpr[end] - fpr[end - 1])
        x = np.append(x, fpr_limit)
        y = np.append(y, pro[end - 1] + slope * (fpr_limit - fpr[end - 1]))
    return float(auc(x, y) / fpr_limit)


def image_f1_max(scores, labels) -> tuple[float, float]:
    """Best F1 over all thresholds, and the threshold reaching it (anomalous when score >= it).

    scores: (N,) anomaly scores. labels: (N,) 1 = anomalous, 0 = normal.
    Returns (NaN, NaN) with a warning when there is no anomalous image.
    Note: the threshold is chosen on the labelled set, so it is an optimistic (oracle) figure.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    if not labels.any():
        return _nan(f"F1 needs anomalous samples, got {labels.size} normal ones"), float("nan")
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores).ravel())
    precision, recall = precision[:-1], recall[:-1]        # the last point has no threshold
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator),
                   where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def threshold_at_fpr(normal_scores, fpr: float) -> float:
    """Decision threshold calibrated on normal scores only (no defective image needed).

    normal_scores: (N,) scores of normal images (or pixels). Rule: with k = floor(fpr * N) (1e-9
    slack against rounding, e.g. 0.29 * 100), the threshold is the (k + 1)-th largest score, i.e.
    the (N - k)-th order statistic (np.quantile with method="inverted_cdf" at 1 - k / N). At most k
    scores, so a fraction <= fpr, lie strictly above it: declare "anomalous" when score > threshold.
    fpr = 0 gives the maximum score; k is capped at N - 1, so fpr = 1 gives the minimum.
    """
    normal_scores = np.asarray(normal_scores).ravel()
    if normal_scores.size == 0 or not 0.0 <= fpr <= 1.0:
        raise ValueError(f"need at least one normal score and 0 <= fpr <= 1, got "
                         f"{normal_scores.size} scores and fpr={fpr}")
    n = normal_scores.size
    k = min(int(np.floor(fpr * n + 1e-9)), n - 1)
    return float(np.partition(normal_scores, n - 1 - k)[n - 1 - k])


def evaluate_arrays(scores, labels, maps=None, masks=None, has_mask=None) -> dict:
    """All image and pixel metrics of one test set.

    scores: (N,) image scores. labels: (N,) 1 = anomalous, 0 = normal. maps: (N, H, W) anomaly
    maps or None. masks: (N, H, W) ground truth or None. has_mask: (N,) bool, whether the mask of
    an image is real (default: all True when masks are given). Normal images always count as
    having an all-zero mask, whatever `masks` holds for them.
    Pixel metrics use the normal images plus the anomalous images with a mask; they are None
    without maps or when no anomalous image has a mask. n_masked is the number of images they
    were computed over (0 when None).
    Returns a dict with image_auroc, pixel_auroc, pixel_aupro, image_f1_max, image_f1_threshold,
    n_images, n_normal, n_anomalous, n_masked.
    """
    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels).astype(bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have one entry per image, got {scores.shape} "
                         f"and {labels.shape}")
    if has_mask is None:
        has_mask = np.full(labels.shape, masks is not None)
    has_mask = np.asarray(has_mask, dtype=bool).ravel()
    f1, f1_threshold = image_f1_max(scores, labels)
    report = dict(image_auroc=image_auroc(scores, labels), pixel_auroc=None, pixel_aupro=None,
                  image_f1_max=f1, image_f1_threshold=f1_threshold, n_images=int(labels.size),
                  n_normal=int((~labels).sum()), n_anomalous=int(labels.sum()), n_masked=0)
    if maps is None or masks is None or not (has_mask & labels).any():
        return report
    maps, masks = _maps_and_masks(maps, masks)
    if maps.shape[0] != labels.size or has_mask.shape != labels.shape:
        raise ValueError(f"maps, masks and has_mask need one entry per image ({labels.size}), got "
                         f"{maps.shape[0]} maps and {has_mask.size} has_mask flags")
    used = has_mask | ~labels
    maps, masks = maps[used], masks[used] & labels[used, None, None]
    report.update(pixel_auroc=pixel_auroc(maps, masks), pixel_aupro=pixel_aupro(maps, masks),
                  n_masked=int(used.sum()))
    return report
