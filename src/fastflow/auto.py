"""Choosing a configuration without defective images: what ``fastflow train`` does with no ``--backbone``.

    fastflow train --data ROOT --category NAME --output RUN_DIR      # = --backbone auto

No single recipe serves aligned objects (a bottle seen from above: each place of the image has its
own normal look) and unaligned surfaces (tiles, textures: any place looks like any other). So the
default trains a short probe of each candidate preset (``CANDIDATES``) on the normal training
images, pastes synthetic defects (data/synthetic.py) onto the held-out normal images, and keeps the
candidate that tells them apart best: the mean of its image AUROC (held-out normals against their
defective copies) and its AUPRO (on the pasted masks). Only normal images are read; the test
split is never touched (after SWSA, "Model Selection of Anomaly Detectors in the Absence of Labeled
Validation Data", arXiv 2310.10461). The chosen preset is then trained in full, exactly as if it had
been named with ``--backbone``; the choice and every candidate's figures are printed and saved in
``run.json`` (key ``auto``). After the full training, on synthetic defects pasted on the same held-out images (more
of them per image, ``choice_set``), a preset whose image score has
its own levels (lite0_unaligned_fine) chooses between that score and the map's max (``choose_score``), and the lite
presets choose which of their levels make the anomaly map, and whether it is corrected at the image border
(``choose_map``, by AUPRO; ``--no-choose-map`` keeps the preset's); both choices are saved in model.pt and shown by ``fastflow info``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import torch

from .config import AUTO_CANDIDATES, ModelConfig, TrainConfig
from .data import DecodedImages, Sample
from .data.preprocess import _resize_bool, load_image
from .data.synthetic import defect_set, iter_defects
from .device import follow_load
from .fused import for_inference
from .metrics import image_auroc, pixel_aupro, pixel_auroc
from .model import border_distance, border_matrix
from .run import load_run, preprocess_for
from .train import planned_epochs, split_validation, train

CANDIDATES = AUTO_CANDIDATES  # config.py says how each was measured
# A later candidate replaces an earlier one only when its synthetic score is higher by more than this. Set when the
# score was the mean of image and pixel AUROC: on bottle the texture recipe came within 0.002 of the aligned one
# (seeds 0-2) and localised the real defects worse (pixel AUROC 0.961 vs 0.984), while on textures its lead was
# 0.05-0.1. With AUPRO in place of pixel AUROC (synthetic_score) the aligned recipe leads bottle by 0.019-0.025.
MARGIN = 0.01
# The map choice (choose_map) takes no map, and no border correction, whose pixel AUROC on the synthetic defects is more
# than this below the configured (uncorrected) map's. It ranks maps by AUPRO, which counts every pasted region alike;
# the pasted defects are small and the finest level alone outlines them best, while pixel AUROC, which counts pixels,
# also sees the larger defects. On 40-image sets of brick the stride-8 map alone led the two-level map by 0.05 synthetic
# AUPRO with a pixel AUROC 0.06 below it, and localised the real defects far worse (pixel AUROC 0.91 against 0.98).
# Replayed on the suite's 30 runs and 15 small-set runs (test figures read across all of them; bench/README.md,
# twenty-ninth round): it kept the map on 34, gave brick and moon back their real defects (pixel AUROC +0.07 to +0.10),
# and cost AUPRO where the finest map's outlines counted (ihc, cell seed 0, 40 Magnetic Tile images: -0.015 to -0.10).
PIXEL_TOLERANCE = 0.01
PROBE_FRACTION = 0.2  # each probe trains this share of its preset's step budget (bottle: 160 steps)
DEFECTS_PER_IMAGE = 2
MAX_SIDE = 1024  # held-out images are shrunk to this before defects are pasted (the inputs are ~256 px)
# At most this many held-out images carry synthetic defects (evenly spread over them), so that the choices' time and
# memory stay bounded on large sets (each scores 3 images and their maps per held-out one; the suite's sets hold 10-76).
MAX_NORMALS = 100
# The choices made after training (choose_map, choose_score) score on more defects than the probes: about
# CHOICE_DEFECTS of them, DEFECTS_PER_IMAGE to MAX_DEFECTS_PER_IMAGE per held-out image (``choice_set``). With 2 per
# image, the map choice on a set of 10-21 held-out images hung on the draw: on three draws over the suite's kept runs
# it made 14 of the 18 right switches; with 8 per image, 24 of 24 on four draws; one wrong switch
# each way (in 45 and in 56 choices; bench/README.md, twenty-second round).
CHOICE_DEFECTS = 200
MAX_DEFECTS_PER_IMAGE = 8


def synthetic_validation(val_samples: list[Sample], seed: int, per_image: int = DEFECTS_PER_IMAGE
                         ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Held-out normal images (at most ``MAX_NORMALS`` of them, evenly spread; shrunk to at most ``MAX_SIDE``
    pixels a side, so that large frames do not fill the memory), and ``per_image`` defective copies of each with
    their masks: (normals, defectives, masks), all (H, W[, 3]) arrays, deterministic by ``seed``."""
    normals = _held_out_images(val_samples)
    defective, masks, _ = defect_set(normals, seed=seed, per_image=per_image)
    return normals, defective, masks


def _held_out_images(val_samples: list[Sample]) -> list[np.ndarray]:
    """At most ``MAX_NORMALS`` of the held-out images, evenly spread, each shrunk to at most ``MAX_SIDE`` a side."""
    if len(val_samples) > MAX_NORMALS:
        val_samples = [val_samples[i] for i in np.linspace(0, len(val_samples) - 1, MAX_NORMALS).round().astype(int)]
    return [_shrunk(np.asarray(load_image(s.path)) if s.array is None else s.array) for s in val_samples]


def choice_set(val_samples: list[Sample], seed: int, model) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                        list[np.ndarray]]:
    """The after-training choices' synthetic set: ``synthetic_validation``'s held-out images and draws, with as many
    defects per image as keep the set near ``CHOICE_DEFECTS`` (8 per image up to 25 held-out images, 2 from 67 on).
    Each image is preprocessed for ``model`` ((3, H, W) tensors) and each mask resized to its input size as soon as
    it is made, so that hundreds of full-size copies are never held at once."""
    normals = _held_out_images(val_samples)
    per_image = max(DEFECTS_PER_IMAGE, min(MAX_DEFECTS_PER_IMAGE, CHOICE_DEFECTS // max(1, len(normals))))
    preprocess, (h, w) = preprocess_for(model), model.config.input_size
    defective, masks = [], []
    for bad, mask, _ in iter_defects(normals, seed, per_image):
        defective.append(preprocess(bad))
        masks.append(_resize_bool(mask, (w, h)))
    return [preprocess(im) for im in normals], defective, masks


def synthetic_score(model, normals: list[np.ndarray], defective: list[np.ndarray], masks: list[np.ndarray],
                    batch_size: int = 16) -> dict:
    """How well ``model`` separates ``defective`` from ``normals``: image AUROC, pixel AUROC and AUPRO (on the
    masks, at input size), and ``score``, the mean of image AUROC and AUPRO. Not pixel AUROC: near 1 for every
    candidate, it could not tell the aligned recipe's maps from the texture recipe's on bottle (within 0.002), nor
    keep the texture recipe on the posed bottle from one draw of the defects to the next; AUPRO could, as the
    real defects did (bench/README.md, twenty-seventh round)."""
    scores, maps = _scores_and_maps(model, normals + defective, preprocess_for(model), batch_size)
    h, w = model.config.input_size
    truth = [np.zeros((h, w), dtype=bool)] * len(normals)
    truth += [_resize_bool(m, (w, h)) for m in masks]
    truth = np.stack(truth)
    labels = np.r_[np.zeros(len(normals)), np.ones(len(defective))]
    img, pix, pro = image_auroc(scores, labels), pixel_auroc(maps, truth), pixel_aupro(maps, truth)
    return {"image_auroc": img, "pixel_auroc": pix, "aupro": pro, "score": (img + pro) / 2}


def _scores_and_maps(model, images: list, preprocess=None, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) and anomaly maps (N, H, W) of ``images`` by the frozen inference form (fused.py): preprocessed
    (3, H, W) tensors, or raw arrays with their ``preprocess`` (run.preprocess_for)."""
    scores, maps = [], []
    for _, out in _outputs(model, images, preprocess, batch_size):
        scores.append(out.score.float().cpu().numpy())
        maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps)


@torch.inference_mode()
def _outputs(model, images: list, preprocess=None, batch_size: int = 16):
    """(the frozen inference form of ``model``, its output) per batch of ``images``: preprocessed (3, H, W) tensors,
    or raw arrays with their ``preprocess`` (run.preprocess_for)."""
    frozen = for_inference(model)
    device = next(frozen.parameters()).device
    for i in range(0, len(images), batch_size):
        follow_load()
        batch = images[i:i + batch_size]
        x = torch.stack([preprocess(im) for im in batch] if preprocess is not None else batch)
        yield frozen, frozen(x.to(device))


def choose_map(model, synthetic: tuple[list, list, list], log=print, border: bool = True) -> dict | None:
    """Which levels' maps make a trained ``model``'s anomaly map, and with what weights, chosen on normal images only
    (TrainConfig.choose_map).

    The candidates (``map_candidates``) keep the finest level: it alone, the two finest, ... every level, and the two
    finest with the second weighted ``MAP_WEIGHTS`` times as much. Each is scored by AUPRO (pixel_aupro) and pixel
    AUROC on synthetic defects pasted on the held-out normal images, its map the weighted mean of its levels' maps;
    among those whose pixel AUROC is at most ``PIXEL_TOLERANCE`` below the configured map's, the best by AUPRO
    replaces the configured map (``model.set_map_levels``) when its AUPRO is higher by more than ``MARGIN``; then the
    map subtracts the held-out normals' mean at each distance from the border (``ModelConfig.border_offsets``) when
    that lifts its AUPRO by more than ``MARGIN`` too, under the same pixel AUROC bound (``_border_choice``;
    ``border=False``: never). The image score stays what it was (an image score taken from the map keeps the preset's
    map levels, equally weighted, as its score levels): the choice is made by localisation alone. ``synthetic``:
    (normals, defectives, masks), ``choice_set``'s for ``model``. Returns the report (saved in model.pt), or None when
    there is nothing to choose (one level)."""
    ids = model.level_ids
    if len(ids) < 2:
        return None
    normals, defective, masks = synthetic
    maps = level_maps(model, normals + defective)  # (N, L, H, W)
    h, w = model.config.input_size
    truth = np.stack([np.zeros((h, w), dtype=bool)] * len(normals) + list(masks))  # choice_set's masks: at (h, w)
    preset = dict(zip(model.map_index, model.map_weights or [1.0] * len(model.map_index)))
    current = tuple(float(preset.get(i, 0.0)) for i in range(len(ids)))
    candidates = list(dict.fromkeys(map_candidates(model) + [current]))
    aupro, pixel = {}, {}
    for c in candidates:
        m = weighted_map(maps, c)
        aupro[c], pixel[c] = pixel_aupro(m, truth), pixel_auroc(m, truth)
    allowed = [c for c in candidates if _pixel_kept(pixel[c], pixel[current])]
    best = max(allowed, key=lambda c: _finite(aupro[c]))
    chosen = best if _finite(aupro[best]) > _finite(aupro[current]) + MARGIN else current
    offsets, corrected = (_border_choice(weighted_map(maps, chosen), len(normals), truth, aupro[chosen], pixel[chosen])
                          if border else (None, None))
    levels, weights, corrects = _kept(chosen), _unequal(chosen), offsets is not None
    if chosen != current or corrects:
        score_from_map = model.score_is_map
        model.set_map_levels(None if len(levels) == len(ids) else tuple(ids[i] for i in levels),
                             None if weights is None else tuple(weights))
        model.set_border_offsets(offsets)
        if score_from_map:  # the image score keeps the preset's map
            model.set_score_levels(tuple(ids[i] for i in _kept(current)))
    name = lambda c: _map_name(c, _strides(model))
    why = _map_why(name, candidates, chosen, current, aupro, pixel, corrected if border else None, corrects,
                   len(defective), len(normals))
    log(f"map: {why}")
    return {"chosen": [ids[i] for i in levels], "weights": weights, "preset": [ids[i] for i in _kept(current)],
            "aupro": {name(c): aupro[c] for c in candidates}, "pixel_auroc": {name(c): pixel[c] for c in candidates},
            "border_corrected": corrects, "border_aupro": corrected, "why": why}


def _map_why(name, candidates: list, chosen: tuple, current: tuple, aupro: dict, pixel: dict, corrected: float | None,
             corrects: bool, n_defective: int, n_normal: int) -> str:
    """``choose_map``'s one-line account of its choice (``corrected``: the border-corrected map's AUPRO, None when the
    correction was not considered)."""
    changed = chosen != current or corrects
    others = sorted((c for c in candidates if c not in (chosen, current)), key=lambda c: -_finite(aupro[c]))[:2]
    barred = [c for c in others if not _pixel_kept(pixel[c], pixel[current])]
    kept = " (the preset's)" if chosen == current else ""
    against = f", against {aupro[current]:.3f} from the preset's {name(current)}" if changed else ""
    bar = lambda c: f" (pixel AUROC {pixel[c]:.3f} against the preset's {pixel[current]:.3f})" if c in barred else ""
    return (f"anomaly map from {name(chosen)}{kept}{', border-corrected' if corrects else ''}: AUPRO "
            f"{corrected if corrects else aupro[chosen]:.3f} on {n_defective} synthetic defects pasted on {n_normal} "
            f"held-out normal images{against}" + ("; next: " if others else "")
            + ", ".join(f"{aupro[c]:.3f} from {name(c)}{bar(c)}" for c in others)
            + (f"; {aupro[chosen]:.3f} without the border correction" if corrects else
               f"; {corrected:.3f} with a border correction" if corrected is not None else "")
            + f" (another map replaces the preset's{', and the border correction is made,' if corrected is not None else ''}"
              f" only with a lead of more than {MARGIN}, and not when its pixel AUROC is more than {PIXEL_TOLERANCE} "
              f"below; the image score is kept)")


def _pixel_kept(pixel: float, reference: float) -> bool:
    """Whether a map's synthetic pixel AUROC is at most ``PIXEL_TOLERANCE`` below ``reference`` (the map choice's bound)."""
    return _finite(pixel) >= _finite(reference) - PIXEL_TOLERANCE


def border_offsets(normal_maps: np.ndarray) -> tuple[float, ...]:
    """``ModelConfig.border_offsets`` from held-out normal images' maps (N, H, W): per distance from the nearest
    border (model.py ``border_distance``), their mean map on that ring, less the median of those means, so that the
    inner rings stay near where they were (and with them the map's scale against the threshold)."""
    ring = border_distance(normal_maps.shape[1:]).ravel()
    means = np.bincount(ring, normal_maps.mean(axis=0).ravel()) / np.bincount(ring)
    return tuple(round(float(v), 6) for v in means - np.median(means))


def _border_choice(maps: np.ndarray, n_normal: int, truth: np.ndarray, aupro: float, pixel: float
                   ) -> tuple[tuple | None, float]:
    """The chosen map's border correction: (offsets when they lift its AUPRO on the synthetic set by more than
    ``MARGIN`` without lowering its pixel AUROC (``pixel``) by more than ``PIXEL_TOLERANCE``, else None; the corrected
    map's AUPRO). ``maps`` (N, H, W): the held-out normals' come first. On
    unaligned surfaces the flows score the outermost pixels high on normal images too; subtracting the normals'
    mean at each distance from the border lifted synthetic and test AUPRO on gravel_wide and mtd_synth, and cost
    Magnetic Tile's real defects, many on the tile's edge, 0.013 (bench/README.md, twenty-fifth round)."""
    offsets = border_offsets(maps[:n_normal])
    h, w = maps.shape[1:]
    fixed = maps - border_matrix((h, w), (h, w), offsets)
    corrected = pixel_aupro(fixed, truth)
    takes = _finite(corrected) > _finite(aupro) + MARGIN and _pixel_kept(pixel_auroc(fixed, truth), pixel)
    return (offsets if takes else None), corrected


# The map choice's weighted candidates: the two finest levels with the second one weighted this many times as much as
# the finest. On bottle the synthetic defects ranked them as the test defects did (stride 8 weighted 3x: test AUPRO
# +0.007 on seeds 0 and 2); no other suite run chose one (bench/README.md, twenty-fourth round).
MAP_WEIGHTS = (2.0, 3.0)


def map_candidates(model) -> list[tuple[float, ...]]:
    """The maps ``choose_map`` scores, as weights per level (model order; 0: the level is left out): the finest
    level, the two finest, ... all of them (finest = smallest stride), then the two finest with the second weighted
    ``MAP_WEIGHTS`` times. The held-out synthetic defects overrated maps without the finest level (the
    stride-16 map on the posed bottle and gravel_wide), and such maps lost test AUPRO on 10 of the 13 suite runs
    where they were measured, winning only on bottle (bench/README.md, twenty-first round)."""
    strides = _strides(model)
    order = sorted(range(len(strides)), key=strides.__getitem__)

    def weights(given: dict[int, float]) -> tuple[float, ...]:
        return tuple(float(given.get(i, 0.0)) for i in range(len(strides)))

    prefixes = [weights(dict.fromkeys(order[:k], 1.0)) for k in range(1, len(order) + 1)]
    return prefixes + [weights({order[0]: 1.0, order[1]: x}) for x in MAP_WEIGHTS]


def weighted_map(maps: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """The map of a candidate: ``maps`` (N, L, H, W) per level, weighted by ``weights`` (one per level, normalised;
    0 leaves a level out), as the model's map with those levels and weights (model.py ``anomaly_map`` is linear
    in the levels). Equal weights take the plain mean of their levels."""
    levels, unequal = _kept(weights), _unequal(weights)
    if unequal is None:
        return maps[:, levels].mean(axis=1)
    share = np.asarray(unequal, dtype=maps.dtype) / sum(unequal)
    return np.tensordot(maps[:, levels], share, axes=([1], [0]))


def _kept(weights: tuple[float, ...]) -> list[int]:
    """The level indices a candidate's ``weights`` keep."""
    return [i for i, x in enumerate(weights) if x]


def _unequal(weights: tuple[float, ...]) -> list[float] | None:
    """The kept levels' weights (``ModelConfig.map_weights``), or None when they are equal (a plain mean)."""
    kept = [weights[i] for i in _kept(weights)]
    return kept if len(set(kept)) > 1 else None


def _map_name(weights: tuple[float, ...], strides: list[int]) -> str:
    """'stride 4', 'strides 4 + 8', or 'strides 4 + 8 (stride 8 weighted 3x)'."""
    levels = _kept(weights)
    least = min(weights[i] for i in levels)
    text = ("stride " if len(levels) == 1 else "strides ") + " + ".join(str(strides[i]) for i in levels)
    return text + "".join(f" (stride {strides[i]} weighted {weights[i] / least:g}x)"
                          for i in levels if weights[i] != least)


def _strides(model) -> list[int]:
    """Each level's stride (input height / feature height), in model order."""
    return [model.config.input_size[0] // fh for _, fh, _ in model.feature_shapes]


@torch.inference_mode()
def level_maps(model, images: list, preprocess=None, batch_size: int = 16) -> np.ndarray:
    """Each level's own anomaly map (upsampled and blurred as in the model's map) of ``images``: (N, L, H, W).
    ``images``: preprocessed (3, H, W) tensors, or raw arrays with their ``preprocess`` (run.preprocess_for).
    The map of any set of levels is the mean of theirs (model.py ``anomaly_map`` is linear in the levels)."""
    size = tuple(model.config.input_size)
    maps = []
    for frozen, out in _outputs(model, images, preprocess, batch_size):
        per_level = [frozen.anomaly_map([z], [ld], size) for z, ld in zip(out.z, out.log_det_maps)]
        maps.append(torch.cat(per_level, dim=1).float().cpu().numpy())
    return np.concatenate(maps)


def choose_score(model, synthetic: tuple[list, list, list], log=print) -> dict | None:
    """Where a trained ``model``'s image score comes from, chosen on normal images only (TrainConfig.choose_score).

    With per-level roles the score is the max of the score levels' map (lite0_unaligned_fine: the stride-32
    flow's). Both that and the max of the anomaly map itself are scored on synthetic defects pasted on the
    held-out normal images; the map replaces the score levels (``model.set_score_levels``) when its image
    AUROC is higher by more than ``MARGIN``. ``synthetic``: as for ``choose_map``. Returns the report (saved in
    model.pt), or None when there is nothing to choose (no separate score levels)."""
    if model.score_index == model.map_index:
        return None
    normals, defective, _ = synthetic
    scores, maps = _scores_and_maps(model, normals + defective)  # (preprocessed) the score levels' max, and the map
    labels = np.r_[np.zeros(len(normals)), np.ones(len(defective))]
    auroc = {"score_levels": image_auroc(scores, labels),
             "map": image_auroc(maps.reshape(len(maps), -1).max(axis=1), labels)}
    strides = _strides(model)
    where = {"score_levels": "the stride-" + "/".join(str(strides[i]) for i in model.score_index)
             + " flow", "map": "the map's max"}
    chosen = "map" if _finite(auroc["map"]) > _finite(auroc["score_levels"]) + MARGIN else "score_levels"
    if chosen == "map":  # the map's own max: its levels, or the map itself when choose_map weighted or corrected it
        model.set_score_levels(model.config.map_levels if model.map_is_mean else None)
    other = "map" if chosen == "score_levels" else "score_levels"
    why = (f"image score from {where[chosen]}: image AUROC {auroc[chosen]:.3f} against {auroc[other]:.3f} from "
           f"{where[other]} on {len(defective)} synthetic defects pasted on {len(normals)} held-out normal images "
           f"(the map's max replaces the flow's only with a lead of more than {MARGIN})")
    log(f"score: {why}")
    score_levels = model.config.score_levels
    return {"chosen": chosen, "score_levels": None if score_levels is None else list(score_levels),
            "image_auroc": auroc, "why": why}


def _shrunk(image: np.ndarray) -> np.ndarray:
    """``image`` with its longer side at most ``MAX_SIDE`` (antialiased), aspect ratio kept."""
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return image
    scale = MAX_SIDE / max(h, w)
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def choose(candidates: list[tuple[str, ModelConfig, TrainConfig]], samples: list[Sample], work_dir: str,
           weights: str = "pretrained", log=print, probe_tag: str = "", device="auto",
           precision: str = "fp32", continue_in: str | None = None, decoded: DecodedImages | None = None
           ) -> tuple[str, ModelConfig, TrainConfig, dict]:
    """Probe every candidate on ``samples`` (normal images only) and return the best one:
    (name, model config, train config, report). ``report`` holds each candidate's synthetic-defect
    figures, the probe length and time, and the reason for the choice; it goes into run.json.
    Probes are trained in ``work_dir/.auto-probe{probe_tag}-NAME`` (one process each, on ``device`` at
    ``precision``, device.py) and removed.

    ``continue_in``: a run folder; the chosen probe's training checkpoint is moved there, so that
    ``train(..., resume=True)`` continues from it instead of training those first epochs again. The
    result is the same model: a probe is the first epochs of the full run (same seed, same batches,
    same noise draws), and resuming restores the optimiser, the RNG and the best epoch so far.

    ``decoded``: the probes share it, so that each image is read once per preprocessing (data/dataset.py); pass
    the same one to the chosen preset's ``train``. Without it the probes make their own."""
    first = candidates[0][2]
    _, val_samples = split_validation(samples, first.val_fraction, first.seed, first.val_min)
    if len(val_samples) < 2:
        return _no_choice(candidates, len(val_samples), len(samples), log)
    t0 = time.perf_counter()
    decoded = DecodedImages() if decoded is None else decoded
    results, preprocessing = {}, {}
    for name, model_cfg, train_cfg in candidates:
        probe_dir = os.path.join(work_dir, f".auto-probe{probe_tag}-{name}")
        probe = probe_config(train_cfg, len(samples) - len(val_samples))
        t1 = time.perf_counter()
        train(model_cfg, probe, samples, probe_dir, weights=weights, progress=False, log=lambda *a, **k: None,
              device=device, precision=precision, decoded=decoded, save_every_epoch=False)
        model, _ = load_run(probe_dir)
        if not results:  # made after the first probe's training, which has checked that every image is readable
            normals, defective, masks = synthetic_validation(val_samples, first.seed)
        preprocessing[name] = preprocess_for(model)
        results[name] = {**synthetic_score(model, normals, defective, masks), "probe_epochs": probe.epochs,
                         "probe_seconds": round(time.perf_counter() - t1, 1)}
        log(f"auto: {name}: synthetic defects image AUROC {results[name]['image_auroc']:.3f}, AUPRO "
            f"{results[name]['aupro']:.3f}, pixel AUROC {results[name]['pixel_auroc']:.3f} (probe of {probe.epochs} "
            f"epochs, {results[name]['probe_seconds']} s)")
    name = pick({n: r["score"] for n, r in results.items()})
    decoded.retain(preprocessing[name])  # the chosen preset's images stay decoded for its full run
    ranked = [name] + sorted((n for n in results if n != name), key=lambda n: -_finite(results[n]["score"]))
    why = (f"best mean of image AUROC and AUPRO (an earlier candidate kept within {MARGIN}) on {len(defective)} synthetic defects pasted on {len(normals)} "
           f"held-out normal images: {results[name]['score']:.3f}"
           + "".join(f" vs {results[n]['score']:.3f} ({n})" for n in ranked[1:]))
    log(f"auto: chose {name}: {why}")
    _, model_cfg, train_cfg = next(c for c in candidates if c[0] == name)
    report = {"chosen": name, "why": why, "candidates": results, "n_normal": len(normals),
              "n_synthetic": len(defective), "seconds": round(time.perf_counter() - t0, 1)}
    if continue_in is not None:
        os.makedirs(continue_in, exist_ok=True)
        os.replace(os.path.join(work_dir, f".auto-probe{probe_tag}-{name}", "checkpoint.pt"),
                   os.path.join(continue_in, "checkpoint.pt"))
        report["continued_after_epochs"] = results[name]["probe_epochs"]
    for n in results:
        shutil.rmtree(os.path.join(work_dir, f".auto-probe{probe_tag}-{n}"), ignore_errors=True)
    return name, model_cfg, train_cfg, report


def _no_choice(candidates: list[tuple[str, ModelConfig, TrainConfig]], n_val: int, n: int, log
               ) -> tuple[str, ModelConfig, TrainConfig, dict]:
    """``choose``'s answer under two held-out images: the first candidate, and why."""
    name, m, t = candidates[0]
    why = f"only {n_val} held-out image(s) (val_fraction {t.val_fraction} of {n}): no choice possible, kept the first candidate"
    log(f"auto: chose {name}: {why}; name a preset with --backbone, hold out more with --val-fraction, or give more normal images")
    return name, m, t, {"chosen": name, "why": why, "candidates": {}}


def pick(scores: dict[str, float]) -> str:
    """The first candidate (in the order given) whose score is within ``MARGIN`` of the best one."""
    best = max(_finite(v) for v in scores.values())
    return next(n for n, v in scores.items() if _finite(v) >= best - MARGIN)


def probe_config(train_cfg: TrainConfig, n_fit: int) -> TrainConfig:
    """The probe's training config: ``PROBE_FRACTION`` of the run's optimiser steps, as a fixed epoch count.
    It makes no score choice (TrainConfig.choose_score): a probe's map flows are far from trained (bench/README.md,
    eighteenth round)."""
    per_epoch = max(1, math.ceil(n_fit / train_cfg.batch_size))
    full = planned_epochs(train_cfg, n_fit) * per_epoch
    return replace(train_cfg, epochs=max(1, math.ceil(PROBE_FRACTION * full / per_epoch)), steps=None,
                   choose_score=False, choose_map=False)  # the probe is scored by synthetic_score; its full run chooses


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf
