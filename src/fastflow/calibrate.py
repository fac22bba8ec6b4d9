"""The decision threshold: calibrated on normal images only, and set again later on more of them.

    fastflow calibrate RUN_DIR --normal-dir DIR [--false-alarm-rate R]

Training calibrates the threshold on its held-out normal images (train.py). With few of them the
requested false-alarm rate cannot be reached: of n scores, a rate r leaves floor(r * n) above the
threshold, which is 0 while n < 1 / r, so the threshold is simply the largest held-out score (a 1%
rate needs at least 100 images). The threshold dict then says so (``reachable: false``,
``n_needed``, ``warning``), training prints the warning, and ``fastflow calibrate`` sets the threshold
again from a folder of good images without retraining: it rewrites the threshold in model.pt and in
the sidecar of an ONNX export beside it, and keeps the previous value in ``previous``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .metrics import threshold_at_fpr


def images_needed(false_alarm_rate: float) -> int:
    """The fewest normal images on which ``false_alarm_rate`` allows one score above the threshold."""
    return math.ceil(1.0 / false_alarm_rate - 1e-9)


def threshold_from_scores(scores, false_alarm_rate: float, calibrated_on: str) -> dict:
    """The threshold dict of a run from the image scores of normal images (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n, needed = int(scores.size), images_needed(false_alarm_rate)
    out = {"value": float(threshold_at_fpr(scores, false_alarm_rate)), "false_alarm_rate": false_alarm_rate,
           "n_val": n, "val_median": float(np.median(scores)), "val_max": float(scores.max()),
           "calibrated_on": calibrated_on, "reachable": n >= needed, "n_needed": needed}
    if n < needed:
        out["warning"] = (f"the threshold rests on {n} normal image(s): a false-alarm rate of {false_alarm_rate:g} "
                          f"needs at least {needed}, so the threshold is the largest of their scores; calibrate "
                          f"it on more good images with fastflow calibrate RUN_DIR --normal-dir DIR")
    return out


def calibrate_run(run_dir: str, inputs: list[str], false_alarm_rate: float | None = None, batch_size: int = 16,
                  progress: bool = False) -> dict:
    """Score the normal images ``inputs`` (files, folders, globs) with the run and write the new threshold
    into its model.pt (and into an ONNX export's sidecar beside it). Returns the new threshold dict; its
    ``previous`` holds the old one. An unreadable image is a DatasetError naming it."""
    import json

    from .checkpoint import load_safe, save_atomic
    from .data import load_image
    from .predict import Predictor, collect_inputs

    if false_alarm_rate is not None and not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"--false-alarm-rate must be in (0, 1), got {false_alarm_rate}")
    model_path = run_dir if run_dir.endswith(".pt") else os.path.join(run_dir, "model.pt")
    paths = collect_inputs(inputs)
    ckpt = load_safe(model_path)
    old = dict(ckpt.get("threshold") or {})
    rate = false_alarm_rate or old.get("false_alarm_rate") or ckpt["train_config"].get("false_alarm_rate", 0.01)
    predictor = Predictor.from_run(model_path, batch_size=batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(paths), desc="calibrate", unit="img", dynamic_ncols=True)
    scores = []
    for start in range(0, len(paths), batch_size):
        chunk = [(np.asarray(load_image(p)), str(p)) for p in paths[start:start + batch_size]]
        scores += [r.score for r in predictor.predict_loaded(chunk)]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    new = threshold_from_scores(scores, rate, "fastflow calibrate: " + ", ".join(map(str, inputs)))
    new["previous"] = {k: v for k, v in old.items() if k != "previous"}
    ckpt["threshold"] = new
    save_atomic(ckpt, model_path)
    for name in sorted(os.listdir(os.path.dirname(os.path.abspath(model_path)))):
        sidecar = os.path.join(os.path.dirname(os.path.abspath(model_path)), name)
        if not (name.endswith(".json") and os.path.isfile(os.path.splitext(sidecar)[0] + ".onnx")):
            continue
        try:
            with open(sidecar) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("format") == "fastflow-onnx":
            from .export import json_threshold

            meta["threshold"] = json_threshold({k: v for k, v in new.items() if k != "previous"})
            with open(sidecar, "w") as f:
                json.dump(meta, f, indent=1)
            new.setdefault("sidecars", []).append(sidecar)
    return new
