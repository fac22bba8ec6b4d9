"""An HTTP server for a trained run: a JSON API with batching, and a web page for a person at the line.

    fastflow serve RUN_DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16] [--batch-window-ms 10]
                           [--max-upload-mb 32] [--runtime torch|onnx] [--onnx MODEL.onnx]

Needs the ``serve`` extra (``pip install 'fastflow[serve]'``: FastAPI, uvicorn, python-multipart).

Endpoints (OpenAPI schema and a try-it page at ``/docs``):
    GET  /          the web page: pick or drop images, see each overlay, score, decision and threshold
    POST /predict   one or several images: multipart (field ``file``, repeatable) or the raw bytes of one
                    image with an ``image/*`` content type. JSON ``{"results": [...]}``, one entry per image:
                    score, normalized_score, is_anomalous, threshold, width, height, and, when asked
                    (``?heatmap=1&overlay=1&mask=1``), those pictures as base64 PNG at the image's size.
                    ``?format=png`` answers one image with one PNG (``&picture=overlay|heatmap|mask``) and
                    the numbers in ``X-Fastflow-*`` headers.
    GET  /health    liveness, and the batching counters (batches run, images, largest batch, sizes)
    GET  /info      preset, backbone, input size, preprocessing, threshold, version, the run's metrics

Batching: each image of each request joins one queue; a single worker takes the first image waiting,
collects more for at most ``batch_window_ms`` (or until ``max_batch``), and runs the model on them as
one batch in a thread, while the event loop goes on receiving and decoding uploads. Under load the
next batch gathers while the current one runs, so throughput approaches the batch throughput of
``fastflow predict``; a lone request waits at most the window.

Bad uploads get a 4xx answer ``{"detail": "one line"}`` and the server goes on: 400 (no image,
wrong field, empty file), 413 (over ``max_upload_mb`` or too many pixels), 415 (a content type that is
neither multipart nor an image), 422 (not an image, truncated or corrupt).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field
except ImportError as _missing:  # the core package does not depend on the server
    raise ImportError(f"fastflow serve needs FastAPI, uvicorn and python-multipart ({_missing.name} is missing): "
                      f"pip install 'fastflow[serve]'") from _missing

from . import __version__
from .data.preprocess import to_rgb
from .predict import Prediction, Predictor, colorize, overlay

FIELDS = ("file", "files")  # multipart field names that carry images
MAX_IMAGES = 64  # images in one request
MAX_PIXELS = 40_000_000  # per image (e.g. 8000 x 5000): decoded pixels, maps and pictures stay in memory
PICTURES = ("heatmap", "overlay", "mask")
# An oversized body up to this many times the limit is read and dropped before the 413: a client that
# sends its whole body before reading (urllib, requests) gets the answer instead of a broken pipe.
DRAIN_FACTOR = 4


class UploadError(Exception):
    """A bad upload: HTTP status and a one-line message naming what was received and what to send."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


# -- response schemas (shown at /docs) ------------------------------------------------------------
class ImageResult(BaseModel):
    filename: str | None = Field(None, description="the upload's file name, when it had one")
    score: float = Field(description="raw image score: the maximum of the anomaly map")
    normalized_score: float | None = Field(
        description="(score - val_median) / (threshold - val_median): about 0 for a typical normal image, 1.0 at "
                    "the threshold; null when the run has no calibration")
    is_anomalous: bool = Field(description="score > threshold")
    threshold: float | None = Field(description="the decision threshold; null when the run has none")
    width: int = Field(description="the image's width in pixels (maps and pictures have this size)")
    height: int = Field(description="the image's height in pixels")
    heatmap: str | None = Field(None, description="base64 PNG of the coloured anomaly map (?heatmap=1)")
    overlay: str | None = Field(None, description="base64 PNG of the heatmap blended over the image (?overlay=1)")
    mask: str | None = Field(None, description="base64 PNG, white where the map exceeds the threshold (?mask=1)")


class PredictResponse(BaseModel):
    results: list[ImageResult] = Field(description="one entry per uploaded image, in upload order")


class BatchStats(BaseModel):
    max_batch: int = Field(description="most images the model runs at once")
    window_ms: float = Field(description="how long the worker waits for more images after the first")
    batches: int = Field(description="model calls so far")
    images: int = Field(description="images scored so far")
    largest_batch: int = Field(description="the largest batch run so far")
    sizes: dict[int, int] = Field(description="batch size -> how many batches had it")
    queued: int = Field(description="images waiting now")


class Health(BaseModel):
    status: Literal["ok"]
    uptime_s: float
    requests: int = Field(description="POST /predict requests answered")
    rejected: int = Field(description="of which answered with a 4xx")
    batching: BatchStats


class Info(BaseModel):
    version: str = Field(description="fastflow version of this server")
    runtime: str = Field(description="torch or onnx")
    model: str = Field(description="the checkpoint or ONNX file served")
    preset: str = Field(description="the preset whose model settings the run uses, or 'custom (...)'")
    backbone: str
    input_size: list[int] = Field(description="(H, W) the network sees")
    preprocessing: dict[str, Any] = Field(description="resize filter, mean, std, contrast steps")
    threshold: dict[str, Any] = Field(description="value, its source (calibrated/user/none) and the calibration")
    quantization: dict[str, Any] | None = Field(None, description="for an int8 ONNX model: how it was quantised")
    metrics: dict[str, Any] | None = Field(None, description="the run's metrics.json (scalars), when present")
    config: dict[str, Any] = Field(description="the run's ModelConfig")
    serving: dict[str, Any] = Field(description="this server's batching and upload limits")


# -- batching -----------------------------------------------------------------------------------------
class Batcher:
    """Collects images from concurrent requests into batches for one model worker thread."""

    def __init__(self, predictor: Predictor, max_batch: int, window_s: float):
        self.predictor, self.max_batch, self.window_s = predictor, max_batch, window_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastflow-model")
        self.sizes: Counter = Counter()

    async def score(self, images: list[np.ndarray]) -> list[Prediction]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(image, future) for image, future in batch if not future.done()]  # client gone
            if not batch:
                continue
            self.sizes[len(batch)] += 1
            images = [image for image, _ in batch]
            try:
                results = await loop.run_in_executor(self.worker, self._predict, images)
            except Exception:  # noqa: BLE001 (one bad image must not fail the others: retry one by one)
                results = [await self._predict_one(loop, image) for image in images]
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _predict(self, images: list[np.ndarray]) -> list[Prediction]:
        return self.predictor.predict_loaded([(image, None) for image in images], batch_size=len(images))

    async def _predict_one(self, loop, image: np.ndarray) -> Prediction | Exception:
        try:
            return (await loop.run_in_executor(self.worker, self._predict, [image]))[0]
        except Exception as e:  # noqa: BLE001 (handed to the waiting request, which answers 500)
            return e

    def stats(self) -> BatchStats:
        return BatchStats(max_batch=self.max_batch, window_ms=self.window_s * 1000, batches=sum(self.sizes.values()),
                          images=sum(k * v for k, v in self.sizes.items()), largest_batch=max(self.sizes, default=0),
                          sizes=dict(sorted(self.sizes.items())), queued=self.queue.qsize())


# -- uploads --------------------------------------------------------------------------------------------
def decode_image(data: bytes, name: str) -> np.ndarray:
    """Uploaded bytes -> upright RGB (H, W, 3) uint8; UploadError (4xx) naming the upload if unusable."""
    if not data:
        raise UploadError(400, f"{name} is empty (0 bytes); send the image file's bytes")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise UploadError(413, f"{name} has {width}x{height} pixels, more than the {MAX_PIXELS:,} allowed; "
                                   f"downscale it")
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except UnidentifiedImageError:
        raise UploadError(422, f"{name} is not an image Pillow can read ({len(data)} bytes); send PNG, JPEG, BMP "
                               f"or TIFF") from None
    except Image.DecompressionBombError:
        raise UploadError(413, f"{name} is too large to decode safely; downscale it") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(422, f"{name} is truncated or corrupt ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
                               f" send the whole file") from None
    return np.asarray(to_rgb(image))


async def read_uploads(request: Request, limit: int) -> list[tuple[str | None, bytes]]:
    """The images of a /predict request: (file name, bytes) pairs; UploadError when the request is wrong."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else 0
    size = f" of {declared:,} bytes" if declared else ""
    too_large = UploadError(413, f"upload{size} is over the limit of {limit:,} bytes (--max-upload-mb); send fewer "
                                 f"or smaller images per request")
    drain = DRAIN_FACTOR * limit  # read (and drop) that much of an oversized body so the client sees the 413
    if declared > drain:
        raise too_large
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > drain:
            break
        if seen <= limit:
            body += chunk
    if seen > limit:
        raise too_large
    body = bytes(body)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _multipart(request, body)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [(request.headers.get("x-filename"), body)]
    raise UploadError(415, f"content type {ctype or 'missing'!r} is not accepted; send multipart/form-data with "
                           f"field 'file', or one image's bytes with an image/* content type")


async def _multipart(request: Request, body: bytes) -> list[tuple[str | None, bytes]]:
    sent = False

    async def replay():  # the body was read above (size-checked); hand it to the form parser
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=MAX_IMAGES, max_fields=MAX_IMAGES)
    except Exception as e:  # noqa: BLE001 (starlette raises its own types for malformed multipart)
        raise UploadError(400, f"malformed multipart body ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                               f"send images in field 'file'") from None
    uploads = []
    try:
        for key, value in form.multi_items():
            if key not in FIELDS:
                raise UploadError(400, f"unexpected multipart field {key!r}; send images in field 'file' "
                                       f"(repeat it for several)")
            if isinstance(value, str):
                raise UploadError(400, f"field {key!r} holds text, not a file; attach the image as a file")
            uploads.append((value.filename or None, await value.read()))
    finally:
        await form.close()
    if not uploads:
        raise UploadError(400, "no image in the request; send images in multipart field 'file'")
    if len(uploads) > MAX_IMAGES:
        raise UploadError(413, f"{len(uploads)} images in one request, at most {MAX_IMAGES}; split the request")
    return uploads


# -- pictures -------------------------------------------------------------------------------------------
def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # speed over size on a local network
    return buffer.getvalue()


def pictures(predictor: Predictor, rgb: np.ndarray, result: Prediction, kinds: tuple[str, ...]) -> dict[str, bytes]:
    """The PNGs of ``kinds`` with the same colour scale as ``fastflow predict``."""
    rng = predictor.heatmap_range()
    low, high = rng if rng is not None else (float(result.anomaly_map.min()), float(result.anomaly_map.max()))
    heat = colorize(result.anomaly_map, low, high) if {"heatmap", "overlay"} & set(kinds) else None
    made = {"heatmap": lambda: heat, "overlay": lambda: overlay(rgb, heat),
            "mask": lambda: result.mask.astype(np.uint8) * 255}
    return {kind: png_bytes(made[kind]()) for kind in kinds}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# -- the app --------------------------------------------------------------------------------------------
def describe(predictor: Predictor, model_path: str, run_dir: str | None) -> dict:
    """What /info says about the model: its config, preprocessing and calibration, the run's metrics."""
    from .config import PRESETS, to_dict

    meta: dict[str, Any] = {}
    if predictor.runtime == "onnx":
        from .export import sidecar_path

        with open(sidecar_path(model_path)) as f:
            meta = json.load(f)
        model_config = meta.get("model_config", {})
    else:
        from .checkpoint import load_safe

        ckpt = load_safe(model_path)
        model_config = ckpt["model_config"]
    preset = next((p.name for p in PRESETS.values() if to_dict(p.model) == model_config), None)
    preset = preset or f"custom ({model_config.get('backbone', '?')})"
    metrics = None
    if run_dir and os.path.isfile(os.path.join(run_dir, "metrics.json")):
        try:
            with open(os.path.join(run_dir, "metrics.json")) as f:
                metrics = {k: v for k, v in json.load(f).items() if isinstance(v, (int, float, str)) or v is None}
        except (OSError, ValueError, AttributeError):
            metrics = None
    cal = predictor.calibration
    return {
        "version": __version__, "runtime": predictor.runtime, "model": os.path.abspath(model_path), "preset": preset,
        "backbone": model_config.get("backbone", "?"), "input_size": list(predictor.preprocess.input_size),
        "preprocessing": predictor.preprocess.to_dict(),
        "threshold": {"value": _finite(predictor.threshold), "source": predictor.threshold_source,
                      "false_alarm_rate": cal.get("false_alarm_rate"), "n_val": cal.get("n_val"),
                      "val_median": cal.get("val_median")},
        "quantization": meta.get("quantization"), "metrics": metrics, "config": model_config,
    }


def create_app(predictor: Predictor, info: dict, max_batch: int = 16, batch_window_ms: float = 10.0,
               max_upload_mb: float = 32.0) -> FastAPI:
    """The FastAPI app serving ``predictor``; ``info`` is what /info shows (see ``describe``)."""
    if max_batch < 1 or batch_window_ms < 0 or max_upload_mb <= 0:
        raise ValueError(f"need max_batch >= 1, batch_window_ms >= 0, max_upload_mb > 0; got {max_batch}, "
                         f"{batch_window_ms}, {max_upload_mb}")
    state = {"started": time.time(), "requests": 0, "rejected": 0, "batcher": None}
    info = {**info, "serving": {"max_batch": max_batch, "batch_window_ms": batch_window_ms,
                                "max_upload_mb": max_upload_mb, "max_images_per_request": MAX_IMAGES,
                                "max_pixels_per_image": MAX_PIXELS}}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(predictor, max_batch, batch_window_ms / 1000)
        state["batcher"] = batcher
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=False)

    app = FastAPI(title="fastflow", version=__version__, lifespan=lifespan,
                  description="Anomaly scores, maps and masks from a trained FastFlow run. The page at / is for people; "
                              "POST /predict is for programs.")
    _add_error_handlers(app, state)
    _add_status_routes(app, state, info)
    _add_predict_route(app, predictor, state, int(max_upload_mb * 2**20))
    return app


def _add_error_handlers(app: FastAPI, state: dict) -> None:
    """Errors as one JSON line: a bad query (422, counted as a rejected /predict), any other (500)."""

    @app.exception_handler(RequestValidationError)
    async def _bad_query(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        state["rejected"] += request.url.path == "/predict"
        return JSONResponse({"detail": f"{where or 'request'}: {first.get('msg', 'invalid')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a JSON line instead of a bare 500 page
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"},
                            status_code=500)


def _add_status_routes(app: FastAPI, state: dict, info: dict) -> None:
    """/ (the page for people), /health (uptime, counts, batching) and /info (``info``)."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("fastflow").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", uptime_s=round(time.time() - state["started"], 3), requests=state["requests"],
                      rejected=state["rejected"], batching=state["batcher"].stats())

    @app.get("/info", response_model=Info)
    async def get_info() -> dict:
        return info


# /predict's request body and answers in the OpenAPI schema (FastAPI cannot infer them: the body is read by hand).
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or more images (repeat the field)"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}, "description": "one image's bytes"}}}}
_PREDICT_RESPONSES = {200: {"content": {"image/png": {}}, "description": "JSON, or one PNG with ?format=png"},
                      400: {"description": "no image, wrong field, empty file"},
                      413: {"description": "upload too large"}, 415: {"description": "unsupported content type"},
                      422: {"description": "not an image, truncated or corrupt"}}


def _add_predict_route(app: FastAPI, predictor: Predictor, state: dict, limit: int) -> None:
    """POST /predict: uploads of at most ``limit`` bytes, decoded in threads, scored by the batcher."""

    @app.post("/predict", response_model=PredictResponse, openapi_extra=_UPLOAD_SCHEMA, responses=_PREDICT_RESPONSES)
    async def predict(request: Request,
                      heatmap: bool = Query(False, description="include the heatmap PNG (base64)"),
                      overlay: bool = Query(False, description="include the overlay PNG (base64)"),
                      mask: bool = Query(False, description="include the mask PNG (base64)"),
                      format: Literal["json", "png"] = Query("json", description="png: one image in, one PNG out"),
                      picture: Literal["overlay", "heatmap", "mask"] = Query(
                          "overlay", description="the PNG returned with format=png")):
        state["requests"] += 1
        try:
            uploads = await read_uploads(request, limit)
            if format == "png" and len(uploads) != 1:
                raise UploadError(400, f"format=png answers one image with one PNG, got {len(uploads)} images; "
                                       f"send one, or use JSON")
            images = await asyncio.gather(*[asyncio.to_thread(decode_image, data, repr(name) if name else
                                                              f"image {i + 1}") for i, (name, data) in
                                            enumerate(uploads)])
        except UploadError as e:
            state["rejected"] += 1
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        results = await state["batcher"].score(images)
        kinds = (picture,) if format == "png" else tuple(k for k, on in zip(PICTURES, (heatmap, overlay, mask)) if on)
        pngs = await asyncio.gather(*[asyncio.to_thread(pictures, predictor, rgb, res, kinds)
                                      for rgb, res in zip(images, results)]) if kinds else [{}] * len(results)
        if format == "png":
            return _png_answer(predictor, results[0], pngs[0][picture])
        threshold = _finite(predictor.threshold)
        return PredictResponse(results=[
            ImageResult(filename=name, score=res.score, normalized_score=_finite(res.normalized_score),
                        is_anomalous=res.is_anomalous, threshold=threshold, width=rgb.shape[1], height=rgb.shape[0],
                        **{k: base64.b64encode(v).decode("ascii") for k, v in png.items()})
            for (name, _), rgb, res, png in zip(uploads, images, results, pngs)])


def _png_answer(predictor: Predictor, res: Prediction, png: bytes) -> Response:
    """?format=png: the one picture, with the score and the decision in headers."""
    headers = {"X-Fastflow-Score": repr(res.score), "X-Fastflow-Is-Anomalous": str(res.is_anomalous).lower(),
               "X-Fastflow-Normalized-Score": repr(_finite(res.normalized_score)),
               "X-Fastflow-Threshold": repr(_finite(predictor.threshold))}
    return Response(png, media_type="image/png", headers=headers)


def serve_run(run_dir: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
              batch_window_ms: float = 10.0, max_upload_mb: float = 32.0, runtime: str = "torch",
              onnx_path: str | None = None, threshold: float | None = None, log_level: str = "info",
              device="auto", precision: str = "fp32", num_threads: int | None = None) -> None:
    """Load the run and serve it until interrupted (what ``fastflow serve`` does). ``device`` / ``precision``
    (device.py): where the torch runtime (or ONNX Runtime's provider) computes."""
    import uvicorn

    predictor = Predictor.from_run(run_dir, threshold, runtime, onnx_path, batch_size=max_batch,
                                   num_threads=num_threads, device=device, precision=precision)
    folder = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    model_path = predictor.source if runtime == "onnx" or not os.path.isdir(run_dir) else os.path.join(run_dir,
                                                                                                     "model.pt")
    app = create_app(predictor, describe(predictor, model_path, folder), max_batch, batch_window_ms, max_upload_mb)
    print(f"serving {model_path} ({runtime}) on http://{host}:{port}/  (API docs: /docs; Ctrl+C stops)", flush=True)
    # Keep-alive 30 s instead of uvicorn's 5: a client posting an image every few seconds keeps its connection.
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)
