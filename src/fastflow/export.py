"""Export a trained run to ONNX: one graph from a normalised image batch to (score, anomaly map).

    fastflow export RUN_DIR --format onnx --output model.onnx

Writes ``model.onnx`` and, next to it, ``model.json`` (same stem): everything needed to use the graph
without fastflow, and what ``Predictor(runtime="onnx")`` reads.

Graph (opset 18 by default; the batch axis is dynamic, height and width are fixed to the input size):
    image        float32 (B, 3, H, W): RGB resized to (H, W), scaled to [0, 1], then (x - mean) / std
    score        float32 (B,): image anomaly score, the maximum of the map
    anomaly_map  float32 (B, 1, H, W): at the network input resolution, Gaussian smoothing included

The decision threshold is not in the graph: it is in the sidecar (``threshold.value``; an image is
anomalous when score > value), so it can be changed without re-exporting.

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)`` by default. The torch.export-based
exporter (``--exporter dynamo``, needs the ``onnxscript`` package, in the ``export`` extra) gives the
same graph outputs to float rounding but is much slower to export (figures: bench/README.md, R8). Every
export ends with a parity check of ONNX Runtime against torch.

The graph is traced from the reference flow (flow.py), not from the inference form (fused.py): that form
writes into slices of preallocated buffers and calls a private oneDNN op, neither of which exports, and
ONNX Runtime folds the constant products itself.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import torch
from torch import nn

from . import __version__
from .model import FastFlow
from .run import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES, load_run, run_folder, sidecar_path

DEFAULT_OPSET = 18
EXPORTERS = ("torchscript", "dynamo")
PARITY_TOL = 1e-4  # rtol and atol of the post-export check; float32 graphs agree to ~1e-6 in practice


class ExportError(RuntimeError):
    """The export cannot be done or its result disagrees with torch; the message says what to do."""


class ScoreAndMap(nn.Module):
    """FastFlow for inference: images (B, 3, H, W) -> (score (B,), anomaly_map (B, 1, H, W))."""

    def __init__(self, model: FastFlow):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(images)
        return out.score, out.anomaly_map


def require_export_extra() -> None:
    """ExportError naming the extra to install when onnx or onnxruntime is missing (before any work)."""
    import importlib

    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"export needs {' and '.join(missing)}, which are not installed: "
                          f"pip install 'fastflow[export]' (or pip install {' '.join(missing)})")


def json_threshold(threshold: dict | None) -> dict:
    """The checkpoint's threshold info with non-finite numbers as null (strict JSON)."""
    out = {}
    for key, value in (threshold or {}).items():
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        out[key] = value
    out.setdefault("value", None)
    return out


def export_onnx(run_dir: str, output: str | None = None, opset: int = DEFAULT_OPSET,
                exporter: str = "torchscript", check: bool = True, device="auto") -> dict:
    """Export the run at ``run_dir`` to ``output`` (default RUN_DIR/model.onnx); returns the sidecar dict.

    The graph is traced on the CPU (it is the same graph for every device); ``device`` (device.py) is
    where the parity check runs: torch on that device against ONNX Runtime with its provider for it
    (CUDA when onnxruntime-gpu is installed; else the CPU, with a warning if a GPU was asked for)."""
    from .device import resolve_device

    resolve_device(device)  # an unavailable device fails before the export, not after

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    require_export_extra()
    model, ckpt = load_run(run_dir)
    if output is None:
        output = os.path.join(run_folder(run_dir), ONNX_FILE)
    if not output.endswith(".onnx"):
        raise ValueError(f"--output must be a .onnx file name, got {output!r}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    height, width = model.config.input_size
    wrapper = ScoreAndMap(model.eval()).eval()
    example = torch.randn(2, 3, height, width)
    _export(wrapper, example, output, opset, exporter)
    _name_output_shapes(output, height, width)

    parity = check_parity(output, model, device=device) if check else None
    meta = {
        "format": "fastflow-onnx",
        "fastflow_version": __version__,
        "onnx_file": os.path.basename(output),
        "opset": opset,
        "exporter": exporter,
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, height, width]}],
        "outputs": [{"name": "score", "dtype": "float32", "shape": ["batch"]},
                    {"name": "anomaly_map", "dtype": "float32", "shape": ["batch", 1, height, width]}],
        "preprocess": {**ckpt["preprocess"], "steps": preprocess_steps(ckpt["preprocess"])},
        "threshold": json_threshold(ckpt.get("threshold")),
        "decision": "anomalous when score > threshold.value; pixel mask: anomaly_map > threshold.value",
        "model_config": ckpt["model_config"],
        "checkpoint_version": ckpt.get("version"),
        "parity": parity,
    }
    with open(sidecar_path(output), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def preprocess_steps(pre: dict) -> str:
    """What a deployment must do to an image before the graph, in words (the sidecar's ``steps``)."""
    contrast = ""
    if pre.get("autocontrast") is not None:
        contrast = (f"stretch the contrast: clip the darkest and brightest {pre['autocontrast']:g}% of the pixels "
                    f"and map the rest linearly to 0-255, one tone curve from the greyscale histogram for all "
                    f"channels (Pillow ImageOps.autocontrast(cutoff, preserve_tone=True)); ")
    elif pre.get("equalize"):
        contrast = "equalise the histogram of each channel (Pillow ImageOps.equalize); "
    return (f"decode to RGB; {contrast}resize to input_size (H, W) with `resize` (Pillow filter, antialiased); "
            f"scale to [0, 1]; (x - mean) / std per channel; CHW")


def _export(wrapper: nn.Module, example: torch.Tensor, output: str, opset: int, exporter: str) -> None:
    common = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset)
    with warnings.catch_warnings(), torch.no_grad():
        # Tracing warns that H/W become constants (intended: the spatial size is fixed) and that the
        # TorchScript exporter is deprecated; neither is actionable for the user.
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            try:
                import onnxscript  # noqa: F401
            except ImportError as e:
                raise ExportError("--exporter dynamo needs onnxscript: pip install onnxscript "
                                  "(or use the default torchscript exporter)") from e
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(wrapper, (example,), output, dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=False, verbose=False, **common)
        else:
            axes = {INPUT_NAME: {0: "batch"}, "score": {0: "batch"}, "anomaly_map": {0: "batch"}}
            torch.onnx.export(wrapper, (example,), output, dynamo=False, dynamic_axes=axes,
                              do_constant_folding=True, **common)


def _name_output_shapes(path: str, height: int, width: int) -> None:
    """Write the exact output shapes into the graph (the tracer's shape inference mislabels them)."""
    import onnx

    graph_model = onnx.load(path)
    shapes = {INPUT_NAME: ["batch", 3, height, width], "score": ["batch"],
              "anomaly_map": ["batch", 1, height, width]}
    for value in list(graph_model.graph.input) + list(graph_model.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[value.name]:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, path)


def check_parity(onnx_path: str, model: FastFlow, batch: int = 2, seed: int = 0, device="cpu") -> dict:
    """Run ONNX Runtime and torch on the same images; ExportError if they differ beyond PARITY_TOL.
    ``device``: torch runs there, ONNX Runtime with the provider for it (``predict.onnx_providers``)."""
    import onnxruntime as ort

    from .device import full_float32, resolve_device
    from .predict import onnx_providers

    target = resolve_device(device)

    height, width = model.config.input_size
    # Smooth random images (not white noise): closer to the inputs the graph will really see.
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, 3, max(2, height // 16), max(2, width // 16), generator=g)
    images = torch.nn.functional.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    images = (images - 0.45) / 0.25
    providers = onnx_providers(target, warn=device not in (None, "auto"))
    session = ort.InferenceSession(onnx_path, providers=providers)
    score, amap = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.numpy()})
    with torch.inference_mode(), full_float32():  # no TF32 on a GPU: a parity check of float32 graphs
        out = model.to(target).eval()(images.to(target))
        ref_score, ref_map = out.score.cpu().numpy(), out.anomaly_map.cpu().numpy()
    diff_score = float(np.abs(score - ref_score).max())
    diff_map = float(np.abs(amap - ref_map).max())
    try:
        np.testing.assert_allclose(score, ref_score, rtol=PARITY_TOL, atol=PARITY_TOL)
        np.testing.assert_allclose(amap, ref_map, rtol=PARITY_TOL, atol=PARITY_TOL)
    except AssertionError as e:
        raise ExportError(f"{onnx_path}: ONNX Runtime disagrees with torch (max |diff| score {diff_score:.2e}, "
                          f"map {diff_map:.2e}, tolerance {PARITY_TOL}); try another --opset or --exporter") from e
    # Random images lie far from the training data, so a trained model's values there are huge: the
    # relative difference is the readable figure (the check above allows rtol and atol alike).
    rel = float(np.abs(amap - ref_map).max() / max(np.abs(ref_map).max(), 1e-12))
    return {"images": batch, "max_abs_diff_score": diff_score, "max_abs_diff_map": diff_map, "max_rel_diff_map": rel,
            "tolerance": PARITY_TOL, "torch_device": str(target), "onnx_provider": session.get_providers()[0]}
