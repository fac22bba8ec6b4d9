"""int8 ONNX export (ONNX Runtime static quantisation): the sidecar, the graph, agreement with float32,
and that ``predict --runtime onnx`` and ``serve --runtime onnx`` run it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastflow.cli import main
from fastflow.predict import Predictor

pytestmark = pytest.mark.export
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_run):
    """The tiny run exported twice with the CLI: (run_dir, fp32 path, int8 path, category folder)."""
    run_dir, category = tiny_run
    out = tmp_path_factory.mktemp("int8")
    fp32, int8 = str(out / "model.onnx"), str(out / "model-int8.onnx")
    assert main(["export", run_dir, "--format", "onnx", "--output", fp32]) == 0
    assert main(["export", run_dir, "--format", "onnx", "--quantize", "int8", "--calibration",
                 os.path.join(category, "train"), "--calibration-images", "8", "--output", int8]) == 0
    return run_dir, fp32, int8, category


def varied_images(category: str) -> list[np.ndarray]:
    """Test images plus edits that move the score (a growing inverted square, noise, a negative):
    a spread of scores, so that a correlation says something even for a barely trained model."""
    tests = sorted(Path(category, "test").rglob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in tests]
    base = images[0]
    for size in (8, 20, 32, 44, 56):
        edited = base.copy()
        edited[20:20 + size, 30:30 + size] = 255 - edited[20:20 + size, 30:30 + size]
        images.append(edited)
    images.append(np.random.default_rng(0).integers(0, 256, base.shape, dtype=np.uint8))
    images.append(255 - base)
    return images


def test_sidecar_says_int8_and_its_calibration(models):
    _, _, int8, category = models
    meta = json.load(open(int8[:-5] + ".json"))
    q = meta["quantization"]
    assert q["dtype"] == "int8" and q["format"] == "QDQ" and "per output channel" in q["weights"]
    assert q["calibration"] == {"folder": os.path.abspath(os.path.join(category, "train")), "images": 8}
    assert meta["onnx_file"] == "model-int8.onnx" and meta["preprocess"]["input_size"] == [64, 64]
    assert meta["threshold"]["value"] is not None  # the run's calibrated threshold travels along


def test_graph_has_int8_convolutions_and_a_float_tail(models):
    import onnx

    graph = onnx.load(models[2]).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(int8_weights) >= len(convs) > 0  # every Conv reads an int8 weight (through DequantizeLinear)
    assert [o.name for o in graph.output] == ["score", "anomaly_map"]  # same interface as float32


def test_int8_scores_and_maps_follow_float32(models):
    _, fp32, int8, category = models
    images = varied_images(category)
    a = Predictor.from_onnx(fp32).predict(images)
    b = Predictor.from_onnx(int8).predict(images)
    sa, sb = np.array([r.score for r in a]), np.array([r.score for r in b])
    # int8 rounds the quantised convolutions' inputs and weights (256 levels per tensor, per channel for
    # weights), so the values move; what deployment needs is that they move together. Measured on this
    # 1-epoch 64x64 model with every convolution quantised: score correlation 0.94 over these images, map
    # correlation 0.96-0.99 per image (the default scope, finest level in float32, is closer still); the
    # bounds leave room for other CPUs' kernels, and a wrong calibration or preprocessing (inputs off by
    # a scale) drops them near 0. The accuracy that matters (AUROC on bottle) is bench/int8.py's.
    assert np.corrcoef(sa, sb)[0, 1] > 0.8
    for x, y in zip(a, b):
        assert np.corrcoef(x.anomaly_map.ravel(), y.anomaly_map.ravel())[0, 1] > 0.9
    assert np.abs(sa - sb).max() < 0.1 * (np.abs(sa).max())


def test_predict_cli_runs_the_int8_model(models, tmp_path):
    run_dir, _, int8, category = models
    out = tmp_path / "out"
    assert main(["predict", run_dir, os.path.join(category, "test"), "--runtime", "onnx", "--onnx", int8,
                 "--output", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == "onnx" and summary["source"] == os.path.abspath(int8)
    assert summary["counts"]["ok"] == summary["counts"]["images"] > 0


def test_quantize_needs_a_calibration_folder(models, capsys):
    run_dir = models[0]
    assert main(["export", run_dir, "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--calibration" in err[0]
    assert main(["export", run_dir, "--quantize", "int8", "--calibration", "/nonexistent/folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]


def test_serve_runs_the_int8_model(models, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra: pip install 'fastflow[serve]'")
    from serve_helpers import post_images, request, start_server, stop_server

    run_dir, _, int8, category = models
    image = sorted(Path(category, "test").rglob("*.png"))[0]
    proc, url = start_server([run_dir, "--runtime", "onnx", "--onnx", int8], tmp_path / "serve.log")
    try:
        info = json.loads(request(url + "/info")[2])
        status, _, body = post_images(url, [("a.png", image.read_bytes())])
    finally:
        stop_server(proc)
    assert info["runtime"] == "onnx" and info["quantization"]["dtype"] == "int8"
    assert status == 200
    expected = Predictor.from_onnx(int8).predict(str(image)).score
    assert json.loads(body)["results"][0]["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
