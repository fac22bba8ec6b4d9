"""Evaluation on a labelled test set (paper Section 4.1): image AUROC, pixel AUROC, AUPRO, F1-max.

    fastflow evaluate RUN_DIR --data ROOT --category NAME --output metrics.json

Pixel metrics are computed at the model's input resolution over the images that have masks
(normal images count as all-zero masks); a dataset without masks gets image metrics only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import AnomalyDataset, Sample
from .fused import for_inference
from .metrics import evaluate_arrays
from .model import FastFlow


@dataclass
class Scored:
    """Per-image results of a model on a labelled set. maps/masks: (N, H, W) at input size."""

    paths: list[str]
    scores: np.ndarray
    labels: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    seconds: float


@torch.inference_mode()
def score_dataset(model: FastFlow, dataset: AnomalyDataset, batch_size: int = 32, progress: bool = False,
                  precision: str = "fp32") -> Scored:
    """Scores and maps of every image, on the model's device (``precision``: device.py); CPU numpy out."""
    from .device import autocast, follow_load

    device = next(model.parameters()).device
    model = for_inference(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True)
    paths, scores, labels, maps, masks, has_mask = [], [], [], [], [], []
    t0 = time.perf_counter()
    for batch in loader:
        follow_load()  # the CLI's threads follow the machine's load between batches (device.py)
        with autocast(device, precision):
            out = model(batch["image"].to(device))
        paths += list(batch["path"])
        scores.append(out.score.float().cpu().numpy())
        maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
        has_mask.append(batch["has_mask"].numpy())
    seconds = time.perf_counter() - t0
    return Scored(paths, np.concatenate(scores), np.concatenate(labels), np.concatenate(maps),
                  np.concatenate(masks), np.concatenate(has_mask).astype(bool), seconds)


def metrics_for(scored: Scored, threshold: float | None = None) -> dict:
    """The metrics dict (JSON keys image_auroc, pixel_auroc, pixel_aupro, image_f1_max, counts, timings)."""
    result = evaluate_arrays(scored.scores, scored.labels, scored.maps, scored.masks, scored.has_mask)
    n = len(scored.scores)
    result["seconds"] = scored.seconds
    result["ms_per_image"] = 1000.0 * scored.seconds / max(n, 1)
    if threshold is not None and np.isfinite(threshold):
        pred = scored.scores > threshold
        normal, anomalous = scored.labels == 0, scored.labels == 1
        result["threshold"] = float(threshold)
        result["false_alarm_rate"] = float(pred[normal].mean()) if normal.any() else None
        result["detection_rate"] = float(pred[anomalous].mean()) if anomalous.any() else None
    return result


def evaluate_model(model: FastFlow, samples: list[Sample], preprocess, batch_size: int = 32,
                   threshold: float | None = None, progress: bool = False, device=None,
                   precision: str = "fp32") -> tuple[dict, Scored]:
    """Metrics of ``model`` on labelled ``samples``. ``device`` (device.py; None: where the model is)
    moves the model there first."""
    if device is not None:
        from .device import resolve_device

        model.to(resolve_device(device))
    scored = score_dataset(model, AnomalyDataset(samples, preprocess), batch_size, progress, precision)
    return metrics_for(scored, threshold), scored


def format_table(rows: dict[str, dict]) -> str:
    """A readable table: one row per category (and 'mean'), the four headline metrics."""
    keys = ["image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max"]
    lines = [f"{'category':<16}" + "".join(f"{k:>14}" for k in keys)]
    for name, m in rows.items():
        cells = "".join(f"{'-' if m.get(k) is None else format(m[k], '.4f'):>14}" for k in keys)
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


def mean_row(rows: dict[str, dict]) -> dict:
    out = {}
    for k in ["image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max"]:
        vals = [m[k] for m in rows.values() if m.get(k) is not None and np.isfinite(m[k])]
        out[k] = float(np.mean(vals)) if vals else None
    return out
