"""Inference on new images: scores, decisions, anomaly maps and masks at each image's own resolution.

    from fastflow.predict import Predictor
    predictor = Predictor.from_run("runs/bottle")            # or runtime="onnx" after `fastflow export`
    for r in predictor.predict(["a.png", "b.jpg"]):
        print(r.path, r.score, r.normalized_score, r.is_anomalous, r.anomaly_map.shape)
    for r in predictor.predict_iter(Path("line").rglob("*.png"), batch_size=16):   # a stream: one batch in memory
        print(r.to_dict())                  # r.ok is False for an unreadable file (PredictionError), not raised

    fastflow predict RUN_DIR IMAGE_OR_FOLDER... --output OUT_DIR [--threshold T] [--runtime torch|onnx]

Threshold: the run's calibrated one (held-out normal images, at the run's false-alarm rate) unless the
caller gives one. An image is anomalous when score > threshold; the mask is anomaly_map > threshold.

normalized_score = (score - m) / (threshold - m), where m is the median score of the held-out normal
images: a typical normal image scores about 0, the threshold sits at 1.0, twice as far from the
normal median scores 2.0. It is NaN when it cannot be defined (no validation images, or a threshold
at or below m).

Heatmaps written by ``fastflow predict`` use one fixed colour scale for every image:
[m, 2 * threshold - m], i.e. normalized score 0 -> bottom of the colormap, 1 (the threshold) -> its
middle, >= 2 -> its top; colours are comparable between images. Without that information (no
calibration), each heatmap is scaled to its own min/max, and the summary says so.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import itertools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import atomic_write
from .data import IMAGE_EXTENSIONS, DatasetError, Preprocess, load_image
from .data.files import is_image_file
from .data.dataset import decode_workers, decoders
from .data.preprocess import to_rgb
from .fused import for_inference
from .run import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, load_run, run_folder, sidecar_path
from .visualize import COLORMAP, OVERLAY_ALPHA, colorize, overlay

RUNTIMES = ("torch", "onnx")


@dataclass
class Prediction:
    """One image's result. Maps are at the image's own (H, W), bilinearly resized from the model's map."""

    path: str | None  # None for arrays
    score: float  # raw image score: max of the model's anomaly map (at the network input size)
    normalized_score: float  # (score - val_median) / (threshold - val_median); the threshold is 1.0
    is_anomalous: bool  # score > threshold (a NaN score counts as anomalous, with a warning)
    anomaly_map: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool: anomaly_map > threshold
    threshold: float = math.inf  # the decision threshold used
    heatmap_scale: tuple[float, float] | None = None  # (low, high) shared by a run's heatmaps; None: own min/max

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "array"
        norm = "nan" if math.isnan(self.normalized_score) else f"{self.normalized_score:.2f}"
        return (f"Prediction({where!r}, score={self.score:.4f}, normalized={norm}, "
                f"{'ANOMALOUS' if self.is_anomalous else 'normal'}, map={self.anomaly_map.shape[1]}x"
                f"{self.anomaly_map.shape[0]}, {int(self.mask.sum())} px over threshold)")

    def heatmap(self) -> np.ndarray:
        """The anomaly map in colour, (H, W, 3) uint8, on the run's fixed scale (see the module docstring)."""
        low, high = self.heatmap_scale or (float(self.anomaly_map.min()), float(self.anomaly_map.max()))
        return colorize(self.anomaly_map, low, high)

    def overlay(self, image=None, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
        """The heatmap blended over the image, (H, W, 3) uint8; ``image`` (path, array or Pillow image) defaults
        to the predicted file."""
        if image is None and self.path is None:
            raise ValueError("overlay() needs the image for a prediction made from an array: overlay(image)")
        rgb, _ = load_input(self.path if image is None else image)
        if rgb.shape[:2] != self.anomaly_map.shape:
            raise ValueError(f"image is {rgb.shape[1]}x{rgb.shape[0]}, the map {self.anomaly_map.shape[1]}x"
                             f"{self.anomaly_map.shape[0]}: pass the image that was predicted")
        return overlay(rgb, self.heatmap(), alpha)

    ok = True  # scored (``predict_iter`` yields a ``PredictionError`` for an item that could not be)

    def to_dict(self) -> dict:
        """The scalar results, JSON-ready (no arrays; NaN and infinity as None)."""
        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"path": self.path, "status": "ok", "score": num(self.score), "normalized_score": num(self.normalized_score),
                "is_anomalous": self.is_anomalous, "threshold": num(self.threshold),
                "height": int(self.anomaly_map.shape[0]), "width": int(self.anomaly_map.shape[1]),
                "anomalous_pixels": int(self.mask.sum())}


@dataclass
class PredictionError:
    """An item ``Predictor.predict_iter`` could not score (unreadable file, bad array), in its place."""

    path: str | None  # None for arrays and Pillow images
    index: int  # the item's position in the input
    error: str  # one line: what was wrong and with which file
    ok = False

    def __repr__(self) -> str:
        return f"PredictionError({self.path or f'item {self.index}'!r}: {self.error})"

    def to_dict(self) -> dict:
        return {"path": self.path, "status": "error", "index": self.index, "error": self.error}


class Predictor:
    """Scores images with a trained run, in torch or in ONNX Runtime (same preprocessing, same outputs).

    Args:
        infer: batch (B, 3, H_in, W_in) float32 numpy -> (score (B,), anomaly_map (B, 1, H_in, W_in)).
        preprocess: how images become network inputs (saved with the run / the ONNX sidecar).
        threshold: calibration dict ({"value", "val_median", ...}); ``value`` may be None/inf.
        user_threshold: overrides ``threshold["value"]`` when given.
        tile: for large frames: the side, in image pixels, of overlapping square tiles each scored as one
            image (see ``tiled``); None scores the whole image at once (resized to the input size).
        tile_overlap: the fraction of a tile shared with the next one, in [0, 1).
    """

    def __init__(self, infer, preprocess: Preprocess, threshold: dict | None, user_threshold: float | None = None,
                 batch_size: int = 16, runtime: str = "torch", source: str = "", *, tile: int | None = None,
                 tile_overlap: float = 0.25):
        self.infer = infer
        self.preprocess = preprocess
        self.calibration = dict(threshold or {})
        calibrated = self.calibration.get("value")
        calibrated = math.inf if calibrated is None else float(calibrated)
        self.threshold = float(user_threshold) if user_threshold is not None else calibrated
        self.threshold_source = "user" if user_threshold is not None else (
            "calibrated" if math.isfinite(calibrated) else "none")
        median = self.calibration.get("val_median")
        self.val_median = None if median is None else float(median)
        self.batch_size = batch_size
        self.runtime = runtime
        self.source = source
        if tile is not None and tile < 16:
            raise ValueError(f"tile must be at least 16 pixels, got {tile}")
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile overlap must be in [0, 1), got {tile_overlap}")
        self.tile, self.tile_overlap = tile, tile_overlap

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_run(cls, path: str, threshold: float | None = None, runtime: str = "torch",
                 onnx_path: str | None = None, batch_size: int = 16, num_threads: int | None = None,
                 device: str | torch.device | None = "auto", precision: str = "fp32", *,
                 tile: int | None = None, tile_overlap: float = 0.25) -> Predictor:
        """A predictor for the run folder (or model.pt) ``path``; ``runtime="onnx"`` reads ``onnx_path``
        (default RUN_DIR/model.onnx, written by ``fastflow export``) and its JSON sidecar.

        ``device``: auto (first GPU, else CPU), cpu, cuda, cuda:N or mps (device.py); ``precision``: fp32,
        bf16 or fp16 (torch runtime only). Batches go to the device, results come back as CPU numpy."""
        from .device import autocast, check_precision, follow_load, resolve_device

        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if threshold is not None and not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        target = resolve_device(device)
        if runtime == "onnx":
            if precision != "fp32":
                raise ValueError(f"precision {precision} is for the torch runtime; the ONNX graph is float32 "
                                 f"(use --precision fp32 with --runtime onnx)")
            if onnx_path is None:
                onnx_path = path if path.endswith(".onnx") else os.path.join(run_folder(path), ONNX_FILE)
            return cls.from_onnx(onnx_path, threshold, batch_size, num_threads, device=device).with_tiles(
                tile, tile_overlap)
        check_precision(precision, target)
        model, ckpt = load_run(path)
        model = for_inference(model.to(target))

        @torch.inference_mode()
        def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            follow_load()  # the CLI's threads follow the machine's load between batches (device.py)
            with autocast(target, precision):
                out = model(torch.from_numpy(batch).to(target))
            return out.score.float().cpu().numpy(), out.anomaly_map.float().cpu().numpy()

        return cls(infer, Preprocess.from_dict(ckpt["preprocess"]), ckpt.get("threshold"), threshold,
                   batch_size, "torch", os.path.abspath(path), tile=tile, tile_overlap=tile_overlap)

    @classmethod
    def from_onnx(cls, onnx_path: str, threshold: float | None = None, batch_size: int = 16,
                  num_threads: int | None = None, device: str | torch.device | None = "auto") -> Predictor:
        """A predictor running ``onnx_path`` in ONNX Runtime, preprocessing as its sidecar says.

        ``device`` cuda / cuda:N: ONNX Runtime's CUDAExecutionProvider when installed (onnxruntime-gpu),
        else the CPU with a warning; auto: CUDA's when both a GPU and that provider are here, else the CPU,
        silently (``onnx_providers``)."""
        from .device import resolve_device

        meta_path = sidecar_path(onnx_path)
        if not os.path.isfile(onnx_path) or not os.path.isfile(meta_path):
            raise FileNotFoundError(f"ONNX model {onnx_path!r} or its sidecar {meta_path!r} not found; create them "
                                    f"with: fastflow export RUN_DIR --format onnx --output {onnx_path}")
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ValueError("runtime onnx needs onnxruntime: pip install 'fastflow[export]'") from e
        with open(meta_path) as f:
            meta = json.load(f)
        pre = dict(meta["preprocess"])
        pre.pop("steps", None)
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        # No busy-waiting between ops: on a shared CPU spinning threads fight other work (measured:
        # bench/README.md, R8).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = onnx_providers(resolve_device(device), warn=device not in (None, "auto"))
        session = ort.InferenceSession(onnx_path, options, providers=providers)

        def infer(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            score, amap = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
            return score, amap

        return cls(infer, Preprocess.from_dict(pre), meta.get("threshold"), threshold, batch_size, "onnx",
                   os.path.abspath(onnx_path))

    def with_threshold(self, threshold: float | None) -> Predictor:
        """The same model with another user threshold (None: back to the calibrated one)."""
        return Predictor(self.infer, self.preprocess, self.calibration, threshold, self.batch_size, self.runtime,
                         self.source, tile=self.tile, tile_overlap=self.tile_overlap)

    def with_tiles(self, tile: int | None, overlap: float = 0.25) -> Predictor:
        """The same model scoring large images in overlapping tiles of ``tile`` pixels (None: whole images)."""
        return Predictor(self.infer, self.preprocess, self.calibration, self._user_threshold(), self.batch_size,
                         self.runtime, self.source, tile=tile, tile_overlap=overlap)

    def _user_threshold(self) -> float | None:
        return self.threshold if self.threshold_source == "user" else None

    # -- inference ------------------------------------------------------------------------------
    def normalize_score(self, score: float) -> float:
        """(score - val_median) / (threshold - val_median); NaN when undefined (see module docstring)."""
        m, t = self.val_median, self.threshold
        if m is None or not math.isfinite(t) or t <= m:
            return math.nan
        return (score - m) / (t - m)

    def predict(self, images, batch_size: int | None = None) -> list[Prediction] | Prediction:
        """One image or a list of them: file paths, (H, W, 3) or (H, W) uint8 arrays, or Pillow images.

        Returns one ``Prediction`` for one image, a list for a list. An unreadable file raises
        ``DatasetError`` naming it (``fastflow predict`` reports it and goes on instead).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        with decoders(len(items)) as pool:
            loaded = list(pool.map(load_input, items))  # the first unreadable item raises, in order
        results = self.predict_loaded(loaded, batch_size)
        return results[0] if single else results

    def predict_iter(self, items, batch_size: int | None = None) -> Iterator[Prediction | PredictionError]:
        """Stream over ``items`` (any iterable of paths, arrays or Pillow images, e.g. a generator over a
        folder of a million files): one result per item, in order, holding one batch of images at a time.

        An item that cannot be read is not raised: a ``PredictionError`` (``ok`` False, with the reason) is
        yielded in its place and the stream goes on. Errors of the model itself still raise."""
        size = batch_size or self.batch_size
        it = iter(items)
        index = 0
        read = attempt(load_input)
        with decoders(size) as pool:
            while chunk := list(itertools.islice(it, size)):
                results: list[Prediction | PredictionError | None] = []
                loaded, where = [], []
                for item, got in zip(chunk, pool.map(read, chunk)):
                    if isinstance(got, Exception):
                        path = str(item) if isinstance(item, (str, Path)) else None
                        results.append(PredictionError(path, index + len(results), " ".join(str(got).split())))
                    else:
                        loaded.append(got)
                        where.append(len(results))
                        results.append(None)
                for i, res in zip(where, self.predict_loaded(loaded, size) if loaded else []):
                    results[i] = res
                index += len(chunk)
                yield from results

    def predict_loaded(self, loaded: list[tuple[np.ndarray, str | None]],
                       batch_size: int | None = None) -> list[Prediction]:
        """(RGB (H, W, 3) uint8 array, path or None) pairs -> predictions, in batches."""
        size = batch_size or self.batch_size
        results: list[Prediction | None] = [None] * len(loaded)
        whole = []
        for i, (rgb, path) in enumerate(loaded):
            if self.tile and max(rgb.shape[:2]) > self.tile:
                results[i] = self.tiled(rgb, path, size)
            else:
                whole.append(i)
        for start in range(0, len(whole), size):
            idx = whole[start:start + size]
            chunk = [loaded[i] for i in idx]
            batch = torch.stack([self.preprocess(rgb) for rgb, _ in chunk]).numpy()
            scores, maps = self.infer(batch)
            for i, (rgb, path), score, amap in zip(idx, chunk, scores, maps):
                results[i] = self._result(path, float(score), amap[0], rgb.shape[:2])
        return results

    def tiled(self, rgb: np.ndarray, path: str | None = None, batch_size: int | None = None) -> Prediction:
        """One large image scored in overlapping tiles: each tile (``self.tile`` pixels high, as wide as the
        input's aspect ratio makes it, ``self.tile_overlap`` of it shared with its neighbours; the last row
        and column flush with the border) is preprocessed and scored like a whole image, so a small defect
        keeps the size it had in the training images instead of being squashed with the frame. The tiles'
        maps, resized back to the tiles, are averaged where tiles overlap; the image score is the maximum of
        that stitched map, at the image's resolution."""
        height, width = rgb.shape[:2]
        in_h, in_w = self.preprocess.input_size
        th = min(self.tile, height)
        tw = min(max(16, round(self.tile * in_w / in_h)), width)
        boxes = [(y, x) for y in _tile_starts(height, th, self.tile_overlap)
                 for x in _tile_starts(width, tw, self.tile_overlap)]
        total = np.zeros((height, width), dtype=np.float32)
        count = np.zeros((height, width), dtype=np.float32)
        size = batch_size or self.batch_size
        for start in range(0, len(boxes), size):
            chunk = boxes[start:start + size]
            batch = torch.stack([self.preprocess(rgb[y:y + th, x:x + tw]) for y, x in chunk]).numpy()
            _, maps = self.infer(batch)
            for (y, x), amap in zip(chunk, maps):
                total[y:y + th, x:x + tw] += resize_map(amap[0], (th, tw))
                count[y:y + th, x:x + tw] += 1.0
        full = total / count
        score = float(full.max())
        return Prediction(path, score, self.normalize_score(score), bool(score > self.threshold), full,
                          full > self.threshold, self.threshold, self.heatmap_range())

    def _result(self, path: str | None, score: float, amap: np.ndarray, size: tuple[int, int]) -> Prediction:
        full = resize_map(amap, size)
        anomalous, mask = score > self.threshold, full > self.threshold
        if math.isnan(score):  # the model cannot vouch for this image: never call it normal
            warnings.warn(f"{path or 'image'}: the anomaly score is NaN (non-finite features or model output); "
                          f"reported as anomalous", RuntimeWarning, stacklevel=3)
            anomalous, mask = True, mask | np.isnan(full)
        return Prediction(path, score, self.normalize_score(score), bool(anomalous), full, mask, self.threshold,
                          self.heatmap_range())

    # -- heatmap scale ----------------------------------------------------------------------------
    def heatmap_range(self) -> tuple[float, float] | None:
        """(low, high) = (m, 2 * threshold - m) shared by all heatmaps; None if not defined."""
        if math.isnan(self.normalize_score(0.0)):
            return None
        m = self.val_median
        return m, 2 * self.threshold - m


def onnx_providers(device: torch.device, warn: bool = True) -> list:
    """ONNX Runtime execution providers for ``device``: CUDA's (on that GPU) then the CPU's when the
    device is a CUDA GPU and onnxruntime-gpu is installed; the CPU's alone otherwise (warning if a GPU
    was asked for and cannot be used)."""
    import warnings

    import onnxruntime as ort

    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0, "use_tf32": 0}), "CPUExecutionProvider"]
    if warn:
        warnings.warn(f"ONNX Runtime runs on the CPU: device {device} asked for, but this onnxruntime has no "
                      f"{'CUDA' if device.type == 'cuda' else device.type} execution provider (available: "
                      f"{', '.join(ort.get_available_providers())}); pip install onnxruntime-gpu for CUDA",
                      RuntimeWarning, stacklevel=3)
    return ["CPUExecutionProvider"]


def _tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared; the
    last one ends at the border."""
    if tile >= length:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def attempt(load: Callable) -> Callable:
    """``load`` returning, instead of raising, the error of an unreadable item (DatasetError, ValueError,
    OSError): for streams that report a bad file and go on."""
    def attempted(item):
        try:
            return load(item)
        except (DatasetError, ValueError, OSError) as e:
            return e
    return attempted


def _in_groups(pool, function, items: list, width: int) -> Iterator:
    """(item, ``function(item)``) for every item in order, ``width`` of them computed at once in ``pool``."""
    for g in range(0, len(items), width):
        yield from zip(items[g:g + width], pool.map(function, items[g:g + width]))


def load_input(item) -> tuple[np.ndarray, str | None]:
    """A path, array or Pillow image -> (upright RGB (H, W, 3) uint8 array, path or None)."""
    if isinstance(item, (str, Path)):
        return np.asarray(load_image(item)), str(item)
    if isinstance(item, Image.Image):
        return np.asarray(to_rgb(item)), None
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8 (0..255), got {item.dtype}; convert with "
                             f"np.clip(x, 0, 255).astype(np.uint8)")
        if item.ndim == 3 and item.shape[2] == 1:
            item = item[:, :, 0]
        if item.ndim == 2:
            return np.repeat(item[:, :, None], 3, axis=2), None
        if item.ndim == 3 and item.shape[2] in (3, 4):
            return (item if item.shape[2] == 3 else np.asarray(to_rgb(Image.fromarray(item)))), None
        raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {item.shape}")
    raise ValueError(f"expected a path, a numpy array or a Pillow image, got {type(item).__name__}")


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) float32 map, bilinear (half-pixel centres, as the model's own upsampling)."""
    if tuple(amap.shape) == tuple(size):
        return np.ascontiguousarray(amap, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()


# -- pictures ---------------------------------------------------------------------------------------
# -- inputs and output names -----------------------------------------------------------------------
def collect_inputs(args: list[str], exclude: str | None = None) -> list[Path]:
    """Files, folders (recursive; image extensions only, hidden files and folders skipped) and glob
    patterns -> absolute file paths, in argument order, without duplicates. Files named explicitly are
    kept whatever their extension (an unreadable one is reported per image). Files that folders and
    globs find inside the folder ``exclude`` (the output folder of ``fastflow predict``) are left out,
    so that a run never scores its own heatmaps."""
    found: list[Path] = []
    skip = Path(exclude).resolve() if exclude else None

    def keep(p: Path) -> bool:
        return skip is None or not p.resolve().is_relative_to(skip)

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found += [p for p in _scan(path) if keep(p)]
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise FileNotFoundError(f"{arg!r} is not a file, a folder or a glob pattern matching anything")
            for m in map(Path, matches):
                found += [p for p in (_scan(m) if m.is_dir() else ([m] if is_image_file(m) else [])) if keep(p)]
    unique, seen = [], set()
    for p in found:  # duplicates found through their real file; kept as given (absolute, links not resolved)
        real = p.resolve()
        if real not in seen:
            seen.add(real)
            unique.append(Path(os.path.abspath(p)))
    if not unique:
        raise FileNotFoundError(f"no image files in {', '.join(args)} "
                                f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return unique


def _scan(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") for part in rel[:-1]):
            continue
        if is_image_file(p):
            files.append(p)
    return files


def _sanitize(text: str) -> str:
    """A safe single file name component: no separators, no leading dots, limited characters."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip(".")
    text = re.sub(r"\.{2,}", ".", text)
    return text[:150] or "image"


def output_names(paths: list[Path], taken: dict[str, str] | None = None) -> dict[str, str]:
    """Absolute path -> output base name (no extension, no separator), unique among ``paths`` and ``taken``
    (path -> name of earlier runs: kept for the same path, avoided for others).

    The name is the file stem; stems shared by several inputs use the path relative to the inputs'
    common folder instead (``good/001.png`` -> ``good__001``); remaining clashes get ``-2``, ``-3``...
    """
    taken = dict(taken or {})
    names: dict[str, str] = {}
    used = {n for p, n in taken.items()}
    stems: dict[str, int] = {}
    for p in paths:
        stems[_sanitize(p.stem)] = stems.get(_sanitize(p.stem), 0) + 1
    root = os.path.commonpath([str(p.parent) for p in paths]) if paths else ""
    for p in paths:
        key = str(p)
        if key in taken:
            names[key] = taken[key]
            continue
        base = _sanitize(p.stem)
        if stems[base] > 1:
            rel = os.path.splitext(os.path.relpath(str(p), root))[0]
            base = _sanitize("__".join(Path(rel).parts))
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}-{k}"
        used.add(name)
        names[key] = name
    return names


# -- the command ------------------------------------------------------------------------------------
SUMMARY_FIELDS = ["path", "status", "score", "normalized_score", "is_anomalous", "heatmap", "overlay", "mask",
                  "error"]
KINDS = ("heatmap", "overlay", "mask")
PIXEL_BUDGET = 1 << 24  # full-size images held at once (16M pixels): a batch of large images is split
# zlib level of the written PNGs: 1 encodes a 900 px overlay in 39 ms against 142 ms at Pillow's default 6, for
# files 25% larger (bench/README.md, fourteenth round); encoding was over half of `fastflow predict`'s time.
PNG_COMPRESS_LEVEL = 1


def predict_to_folder(predictor: Predictor, inputs: list[str], out_dir: str, batch_size: int = 16,
                      overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Score every input image and write heatmap/overlay/mask PNGs and summary.{csv,json} to ``out_dir``.

    Layout: OUT/heatmap/NAME.png, OUT/overlay/NAME.png, OUT/mask/NAME.png (NAME from ``output_names``).
    An unreadable image gets status "error" in the summary; the others are still done. Images already
    in OUT's summary (same run, runtime and threshold, outputs present) are skipped unless ``overwrite``.
    Returns the summary dict (also written to summary.json).
    """
    paths = collect_inputs(inputs, exclude=out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for kind in KINDS:
        os.makedirs(os.path.join(out_dir, kind), exist_ok=True)
    header = _summary_header(predictor)
    previous = {} if overwrite else _previous_records(out_dir, header)
    names = output_names(paths, {p: r["name"] for p, r in previous.items() if r.get("name")})
    records = dict(previous)
    todo = [p for p in paths if overwrite or not _done(out_dir, previous.get(str(p)))]
    skipped = len(paths) - len(todo)
    if skipped:
        log(f"skipping {skipped} image(s) already done in {out_dir} (use --overwrite to redo them)")
    if header["threshold"]["source"] == "none":
        log("warning: this run has no calibrated threshold (no validation images); every image counts as "
            "normal and heatmaps use per-image scales. Pass --threshold T.")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="predict", unit="img", dynamic_ncols=True)
    read, write = attempt(load_input), lambda d: _write_outputs(predictor, d[0], d[1][0], out_dir, names[d[0].path])
    with decoders(batch_size) as pool:
        width = decode_workers(batch_size)  # decoded at once: memory stays near PIXEL_BUDGET plus this many
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            loaded, pixels = [], 0
            for i, (p, got) in enumerate(_in_groups(pool, read, chunk, width)):
                if isinstance(got, Exception):
                    records[str(p)] = {"path": str(p), "name": names[str(p)], "status": "error", "error": str(got)}
                else:
                    loaded.append(got)
                    pixels += got[0].shape[0] * got[0].shape[1]
                if loaded and (pixels >= PIXEL_BUDGET or i == len(chunk) - 1):  # large images: fewer at once
                    done = zip(predictor.predict_loaded(loaded, batch_size), loaded)
                    for record in pool.map(write, done):  # PNGs encoded in the pool too (Pillow lets go of the GIL)
                        records[record["path"]] = record
                    loaded, pixels = [], 0
            _write_summary(out_dir, header, records)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    summary = _write_summary(out_dir, header, records, skipped=skipped)
    return summary


def _write_outputs(predictor: Predictor, res: Prediction, rgb: np.ndarray, out_dir: str, name: str) -> dict:
    rng = predictor.heatmap_range()
    low, high = rng if rng is not None else (float(res.anomaly_map.min()), float(res.anomaly_map.max()))
    heat = colorize(res.anomaly_map, low, high)
    files = {kind: os.path.join(kind, name + ".png") for kind in KINDS}
    for kind, picture in (("heatmap", heat), ("overlay", overlay(rgb, heat)),
                          ("mask", res.mask.astype(np.uint8) * 255)):
        target = os.path.join(out_dir, files[kind])
        assert os.path.dirname(os.path.abspath(target)) == os.path.abspath(os.path.join(out_dir, kind))
        Image.fromarray(picture).save(target, compress_level=PNG_COMPRESS_LEVEL)
    return {"path": res.path, "name": name, "status": "ok", "score": res.score,
            "normalized_score": None if math.isnan(res.normalized_score) else res.normalized_score,
            "is_anomalous": res.is_anomalous, **files, "error": None}


def _summary_header(predictor: Predictor) -> dict:
    cal = predictor.calibration
    rng = predictor.heatmap_range()
    return {
        "source": predictor.source,
        "runtime": predictor.runtime,
        "threshold": {
            "value": predictor.threshold if math.isfinite(predictor.threshold) else None,
            "source": predictor.threshold_source,
            "calibrated_value": cal.get("value") if cal.get("value") is not None and math.isfinite(
                cal["value"]) else None,
            "false_alarm_rate": cal.get("false_alarm_rate"),
            "n_val": cal.get("n_val"),
            "val_median": cal.get("val_median"),
            "val_max": cal.get("val_max"),
        },
        "normalized_score": "(score - val_median) / (threshold - val_median): threshold at 1.0",
        "heatmap_scale": ({"colormap": COLORMAP, "low": rng[0], "high": rng[1],
                           "meaning": "fixed for all images: normalized score 0 -> low, 1 (threshold) -> middle, "
                                      "2 -> high"} if rng is not None else
                          {"colormap": COLORMAP, "low": None, "high": None,
                           "meaning": "per image min..max (no calibrated threshold): not comparable"}),
    }


def _previous_records(out_dir: str, header: dict) -> dict[str, dict]:
    """Records of an earlier run in ``out_dir`` with the same model, runtime and threshold; else none."""
    path = os.path.join(out_dir, "summary.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
        same = (old.get("source") == header["source"] and old.get("runtime") == header["runtime"]
                and old.get("threshold", {}).get("value") == header["threshold"]["value"])
        return {r["path"]: r for r in old.get("results", [])} if same else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _done(out_dir: str, record: dict | None) -> bool:
    return bool(record and record.get("status") == "ok"
                and all(record.get(k) and os.path.isfile(os.path.join(out_dir, record[k])) for k in KINDS))


def _write_summary(out_dir: str, header: dict, records: dict[str, dict], skipped: int = 0) -> dict:
    results = sorted(records.values(), key=lambda r: r["path"])
    ok = [r for r in results if r["status"] == "ok"]
    summary = {**header, "counts": {"images": len(results), "ok": len(ok),
                                    "error": len(results) - len(ok),
                                    "anomalous": sum(bool(r["is_anomalous"]) for r in ok),
                                    "skipped_this_run": skipped},
               "results": results}
    atomic_write(os.path.join(out_dir, "summary.json"), lambda f: json.dump(summary, f, indent=1))

    def write_csv(f):
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_FIELDS})

    atomic_write(os.path.join(out_dir, "summary.csv"), write_csv)
    return summary
