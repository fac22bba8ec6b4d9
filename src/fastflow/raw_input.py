"""An ONNX graph for deployments that do not copy our preprocessing: a uint8 image of any size in.

    fastflow export RUN_DIR --format onnx --raw-input        # -> RUN_DIR/model_raw.onnx + model_raw.json

Graph:
    image        uint8 (H, W, 3): one RGB image as decoded (``np.asarray(PIL.Image.open(p).convert("RGB"))``),
                 any H and W
    score        float32 (1,): the image score, as ``Predictor`` gives it
    anomaly_map  float32 (1, 1, h, w): at the network input size (h, w)

Inside the graph, what ``data.Preprocess`` does with Pillow: the antialiased bilinear resize to (h, w)
(Pillow's triangle filter, its support widened by the scale factor when shrinking, weights normalised
per output pixel; horizontal pass first, each pass rounded to 0..255 as Pillow's 8-bit images are),
scaling to [0, 1] and (x - mean) / std; the order of the two passes follows Pillow's rule (vertical
first when the height shrinks by more than twice as many pixels as the width, since Pillow 11; older
Pillow always ran the horizontal pass first). The resize weights are computed in the graph from H and W, so
one graph serves every image size. Pillow computes in fixed point, this graph in float32: a pixel may
differ by one grey level, and the scores agree to about 1e-3 of their value (measured in the tests).

A model that stretches or equalises the contrast first (--autocontrast, --equalize) cannot be exported
so: use the plain export and do those steps as its sidecar says.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
from torch import nn

from . import __version__
from .export import ExportError, json_threshold, require_export_extra
from .run import OUTPUT_NAMES, load_run, run_folder, sidecar_path

INPUT_NAME = "image"


def antialias_weights(ones: torch.Tensor, n_out: int) -> torch.Tensor:
    """(n_out, n_in) resize matrix of Pillow's antialiased bilinear filter along one axis; ``ones`` is a
    float (n_in,) vector of ones (n_in from the data, so that an exported graph keeps it dynamic)."""
    n_in = ones.sum()
    centre_in = torch.cumsum(ones, 0) - 0.5  # source pixel centres j + 0.5
    scale = n_in / n_out
    support = torch.clamp(scale, min=1.0)  # the triangle widened when shrinking: antialiasing
    centre_out = (torch.arange(n_out, dtype=torch.float32) + 0.5) * scale
    w = torch.relu(1.0 - torch.abs(centre_in[None, :] - centre_out[:, None]) / support)
    return w / w.sum(dim=1, keepdim=True)


class RawImageModel(nn.Module):
    """uint8 (H, W, 3) image -> (score (1,), anomaly_map (1, 1, h, w)): preprocessing inside the graph."""

    def __init__(self, model: nn.Module, mean, std, input_size: tuple[int, int]):
        super().__init__()
        self.model = model
        self.out_h, self.out_w = (int(s) for s in input_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1))

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (H, W, 3) -> float32 (3, h, w) in 0..255, as Pillow's ``resize(BILINEAR)`` of an RGB image."""
        x = image.permute(2, 0, 1).to(torch.float32)
        rows = torch.ones_like(x[0, :, 0])
        cols = torch.ones_like(x[0, 0, :])
        wh, ww = antialias_weights(rows, self.out_h), antialias_weights(cols, self.out_w).t()

        def to_8bit(v: torch.Tensor) -> torch.Tensor:  # each pass rounded half up to 0..255, as Pillow's are
            return torch.clamp(torch.floor(v + 0.5), 0.0, 255.0)

        horizontal_first = to_8bit(torch.matmul(wh, to_8bit(torch.matmul(x, ww))))
        vertical_first = to_8bit(torch.matmul(to_8bit(torch.matmul(wh, x)), ww))
        # Pillow >= 11 runs the vertical pass first when the height shrinks by more than twice as many pixels
        # as the width (libImaging/Resample.c); both are computed and one is chosen, so the graph has no branch
        shrink_h, shrink_w = rows.sum() - self.out_h, cols.sum() - self.out_w
        vertical = (shrink_h > 0) & (shrink_h > 2 * shrink_w)
        return torch.where(vertical, vertical_first, horizontal_first)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.resize(image) / 255.0 - self.mean) / self.std
        out = self.model(x[None])
        return out.score, out.anomaly_map


def export_raw_onnx(run_dir: str, output: str | None = None, opset: int = 18, check: bool = True) -> dict:
    """Export the run at ``run_dir`` as a graph from a uint8 image of any size (default
    RUN_DIR/model_raw.onnx, sidecar model_raw.json); returns the sidecar dict."""
    require_export_extra()
    model, ckpt = load_run(run_dir)
    pre = ckpt["preprocess"]
    if pre.get("autocontrast") is not None or pre.get("equalize"):
        raise ExportError("--raw-input: this model stretches or equalises each image's contrast before resizing, "
                          "which the graph does not do; export without --raw-input and follow its sidecar's steps")
    if pre.get("resize", "bilinear") != "bilinear":
        raise ExportError(f"--raw-input reproduces Pillow's bilinear resize only; this model uses {pre['resize']!r}")
    if output is None:
        output = os.path.join(run_folder(run_dir), "model_raw.onnx")
    if not output.endswith(".onnx"):
        raise ValueError(f"--output must be a .onnx file name, got {output!r}")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    height, width = model.config.input_size
    wrapper = RawImageModel(model.eval(), pre["mean"], pre["std"], (height, width)).eval()
    example = torch.randint(0, 256, (height + 37, width + 11, 3), dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about constants: intended for the model part
        torch.onnx.export(wrapper, (example,), output, dynamo=False, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), opset_version=opset, do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "height", 1: "width"}})
    parity = check_raw_parity(output, model, pre) if check else None
    meta = {
        "format": "fastflow-onnx-raw",
        "fastflow_version": __version__,
        "onnx_file": os.path.basename(output),
        "opset": opset,
        "inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": ["height", "width", 3],
                    "meaning": "one RGB image as decoded, any size (e.g. np.asarray(PIL.Image.open(p).convert('RGB')))"}],
        "outputs": [{"name": "score", "dtype": "float32", "shape": [1]},
                    {"name": "anomaly_map", "dtype": "float32", "shape": [1, 1, height, width]}],
        "preprocess": {**pre, "steps": "inside the graph: antialiased bilinear resize as Pillow, /255, (x - mean) / std"},
        "threshold": json_threshold(ckpt.get("threshold")),
        "decision": "anomalous when score > threshold.value; pixel mask: anomaly_map > threshold.value",
        "model_config": ckpt["model_config"],
        "parity": parity,
    }
    with open(sidecar_path(output), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def check_raw_parity(onnx_path: str, model: nn.Module, pre: dict, seed: int = 0) -> dict:
    """ONNX Runtime on uint8 images of a few sizes against the model on ``data.Preprocess``'s input (Pillow's
    resize, torch), as ``Predictor`` runs it: ExportError when a score differs by more than 1% of its value."""
    import onnxruntime as ort
    from PIL import Image

    from .data import Preprocess

    preprocess = Preprocess.from_dict(pre)
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    h, w = preprocess.input_size
    worst = 0.0
    for size in ((h, w), (2 * h + 13, 3 * w - 7), (h // 2 + 5, w + 29)):
        low = rng.integers(0, 256, (max(2, size[0] // 16), max(2, size[1] // 16), 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(low).resize((size[1], size[0]), Image.Resampling.BILINEAR))
        score = float(session.run(["score"], {INPUT_NAME: image})[0][0])
        with torch.inference_mode():
            ref = float(model(preprocess(image)[None]).score[0])
        worst = max(worst, abs(score - ref) / max(abs(ref), 1e-6))
    if worst > 1e-2:
        raise ExportError(f"{onnx_path}: the raw-input graph's scores differ from Predictor's by {worst:.1e} of "
                          f"their value; export without --raw-input")
    return {"images": 3, "max_rel_diff_score": worst}
