"""``fastflow info RUN_DIR``: what a run folder holds, in one screen.

    fastflow info runs/bottle [--json]

Configuration (preset values as trained), the data it was trained on, the threshold and how it was
calibrated, training (kept epoch, time), metrics when ``evaluate`` wrote them, the fastflow version that
wrote the model, and the files with their sizes.
"""

from __future__ import annotations

import json
import math
import os


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_info(run_dir: str) -> dict:
    """Everything ``fastflow info`` shows, as a JSON-ready dict."""
    from .checkpoint import load_safe
    from .export import json_threshold

    folder = os.path.dirname(run_dir) if run_dir.endswith(".pt") else run_dir
    ckpt = load_safe(run_dir if run_dir.endswith(".pt") else os.path.join(run_dir, "model.pt"))
    run = _read_json(os.path.join(folder, "run.json")) or {}
    history = _read_json(os.path.join(folder, "history.json")) or {}
    threshold = json_threshold(ckpt.get("threshold"))
    if isinstance(threshold.get("previous"), dict):
        threshold["previous"] = json_threshold(threshold["previous"])
    files = {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
             if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".")}
    return {
        "run": os.path.abspath(folder), "version": ckpt.get("version"),
        "model_config": ckpt["model_config"], "train_config": ckpt["train_config"], "preprocess": ckpt["preprocess"],
        "backbone_weights": ckpt.get("backbone_weights"), "data": run.get("data"),
        "preset": run.get("preset"), "auto": run.get("auto"), "score_choice": ckpt.get("score_choice"),
        "map_choice": ckpt.get("map_choice"),
        "training": {"best_epoch": ckpt.get("best_epoch"), "kept_epochs": ckpt.get("kept_epochs"),
                     "best_val_nll": ckpt.get("best_val_nll"),
                     "n_fit": ckpt.get("n_fit"), "n_val": ckpt.get("n_val"),
                     "epochs_run": len(history.get("history", [])) or None,
                     "train_seconds": history.get("train_seconds")},
        "threshold": threshold, "metrics": _read_json(os.path.join(folder, "metrics.json")), "files": files,
    }


def _length(t: dict) -> str:
    """How long the run trains: a step budget (at most ``epochs`` epochs) or a fixed epoch count."""
    steps = t.get("steps")
    return f"{steps} optimiser steps (at most {t['epochs']} epochs)" if steps else f"{t['epochs']} epochs"


def format_info(info: dict) -> str:
    """The readable form of ``run_info``."""
    from .run import kept_epochs_text

    m, t, th = info["model_config"], info["train_config"], info["threshold"]
    tr = info["training"]
    levels = ",".join(map(str, m["levels"])) if m.get("levels") else "default"
    lines = [
        f"run        {info['run']} (written by fastflow {info['version']})",
        f"model      {m['backbone']} ({info['backbone_weights']} weights), input {m['input_size'][0]}x"
        f"{m['input_size'][1]}, levels {levels}, {m['flow_steps']} steps, hidden ratio {m['hidden_ratio']}, "
        f"kernels {m['kernels']}, map {m['anomaly_map']} (blur sigma {m['smoothing_sigma']})",
        f"training   {_length(t)} at batch {t['batch_size']}, lr {t['lr']:g}, feature noise "
        f"{t['feature_noise']:g}, seed {t['seed']}; kept {kept_epochs_text(tr['best_epoch'], tr.get('kept_epochs'))}"
        + (f", {tr['train_seconds']:.0f} s" if tr.get("train_seconds") else "")
        + (f"; {tr['n_fit']} images fitted, {tr['n_val']} held out" if tr.get("n_fit") is not None else ""),
    ]
    if info.get("auto"):  # the default (--backbone auto) chose the preset on synthetic defects
        lines.append(f"chosen     {info['preset']} by --backbone auto: {info['auto'].get('why', '')}")
    if info.get("map_choice"):  # TrainConfig.choose_map: which levels make the anomaly map
        lines.append(f"map        {info['map_choice']['why']}")
    if info.get("score_choice"):  # TrainConfig.choose_score: the score levels' or the map's max
        lines.append(f"score      {info['score_choice']['why']}")
    data = info.get("data")
    if data:
        options = f", {data['options']}" if data.get("options") else ""
        lines.append(f"data       {data['format']} {data['root']} category {data['category']}{options}")
    value = th.get("value")
    if value is None or not math.isfinite(value):
        lines.append("threshold  none (no held-out images): pass --threshold to predict, or fastflow calibrate")
    else:
        how = th.get("calibrated_on", "held-out training images")
        lines.append(f"threshold  {value:.4f} at false-alarm rate {th.get('false_alarm_rate')} on {th.get('n_val')} "
                     f"normal images ({how}); median normal score {th.get('val_median', float('nan')):.4f}")
        if th.get("warning"):
            lines.append(f"           warning: {th['warning'].replace('RUN_DIR', info['run'])}")
    metrics = info.get("metrics")
    if metrics:
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")
                          if isinstance(metrics.get(k), (int, float)))
        lines.append(f"metrics    {shown} ({metrics.get('n_images')} test images)")
    else:
        lines.append("metrics    none yet (fastflow evaluate RUN_DIR)")
    lines.append("files      " + ", ".join(f"{n} ({_size(b)})" for n, b in info["files"].items()))
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
