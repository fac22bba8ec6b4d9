"""The decision threshold: calibrated on normal images only, and set again later on more of them.

    fastflow calibrate RUN_DIR --normal-dir DIR [--false-alarm-rate R]

Training calibrates the threshold on its held-out normal images (train.py). With n of them, a rate r
leaves floor(r * n) scores above the threshold, so the threshold is read off the scores (an order
statistic) once n >= 1 / r (a 1% rate: 100 images). With fewer, the largest held-out score would be the
only order statistic left, and a new good image exceeds the largest of n with probability 1 / (n + 1)
(9% for 10 images, whatever r was asked for). Below 1 / r the threshold is therefore the upper 1 - r
prediction bound of a normal distribution fitted to the scores: mean + t(1 - r, n - 1) * sd * sqrt(1 + 1/n),
which a new score from the same normal distribution exceeds with probability exactly r (below
``MIN_FIT`` images, the largest score); what it changed on the suite's runs: bench/README.md, twelfth
round. The threshold dict says which rule set it (``method``) and warns while n < 1 / r (``reachable:
false``, ``n_needed``, ``warning``); ``fastflow calibrate`` sets the threshold again from a folder of good
images without retraining: it rewrites the threshold in model.pt and in the sidecar of an ONNX export
beside it, and keeps the previous value in ``previous``.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .metrics import threshold_at_fpr


def images_needed(false_alarm_rate: float) -> int:
    """The fewest normal images on which ``false_alarm_rate`` allows one score above the threshold."""
    return math.ceil(1.0 / false_alarm_rate - 1e-9)


MIN_FIT = 3  # fewest normal scores a normal fit is made on; below it the threshold is their largest


def normal_prediction_bound(scores, false_alarm_rate: float) -> float:
    """The upper 1 - rate prediction bound for one more score, the scores being a normal sample:
    mean + t(1 - rate, n - 1) * sd * sqrt(1 + 1 / n) (sd with n - 1 degrees of freedom)."""
    from scipy.stats import t

    scores = np.asarray(scores, dtype=np.float64).ravel()
    n = scores.size
    if n < 2:
        raise ValueError(f"a prediction bound needs at least 2 scores, got {n}")
    return float(scores.mean() + t.ppf(1.0 - false_alarm_rate, n - 1) * scores.std(ddof=1) * math.sqrt(1 + 1 / n))


def threshold_from_scores(scores, false_alarm_rate: float, calibrated_on: str) -> dict:
    """The threshold dict of a run from the image scores of normal images (see the module docstring)."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n, needed = int(scores.size), images_needed(false_alarm_rate)
    if n >= needed:
        value, method = threshold_at_fpr(scores, false_alarm_rate), "order statistic"
    elif n >= MIN_FIT:
        value, method = normal_prediction_bound(scores, false_alarm_rate), "normal prediction bound"
    else:
        value, method = scores.max(), "largest score"
    out = {"value": float(value), "false_alarm_rate": false_alarm_rate, "method": method,
           "n_val": n, "val_median": float(np.median(scores)), "val_max": float(scores.max()),
           "calibrated_on": calibrated_on, "reachable": n >= needed, "n_needed": needed}
    if n < needed:
        rule = ("the largest of their scores" if method == "largest score" else
                f"the {1 - false_alarm_rate:g} prediction bound of a normal fit to their scores")
        out["warning"] = (f"the threshold rests on {n} normal image(s): a false-alarm rate of {false_alarm_rate:g} "
                          f"needs at least {needed} to be read off their scores, so the threshold is {rule}; "
                          f"calibrate it on more good images with fastflow calibrate RUN_DIR --normal-dir DIR")
    return out


def calibrate_run(run_dir: str, inputs: list[str], false_alarm_rate: float | None = None, batch_size: int = 16,
                  progress: bool = False) -> dict:
    """Score the normal images ``inputs`` (files, folders, globs) with the run and write the new threshold
    into its model.pt (and into an ONNX export's sidecar beside it). Returns the new threshold dict; its
    ``previous`` holds the old one. An unreadable image is a DatasetError naming it."""
    import json

    from .checkpoint import load_safe, save_atomic
    from .data.dataset import decoders
    from .predict import Predictor, collect_inputs, load_input

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
    with decoders(batch_size) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(pool.map(load_input, paths[start:start + batch_size]))
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
