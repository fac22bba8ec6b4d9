"""ONNX export: one graph (image -> score, anomaly map), dynamic batch, sidecar, parity with torch."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow import __version__
from fastflow.checkpoint import load_safe
from fastflow.cli import main
from fastflow.config import ModelConfig
from fastflow.predict import Predictor

pytestmark = pytest.mark.export
ort = pytest.importorskip("onnxruntime")

# Float32 graphs of the same operations: measured differences are ~1e-6; 1e-4 leaves room for
# different kernel choices (reduction order) between ONNX Runtime and torch without hiding real bugs.
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run):
    """A 1-epoch 64x64 run, exported with the CLI; returns (run_dir, onnx_path, test images folder)."""
    run_dir, category_dir = tiny_run
    onnx_path = str(tmp_path_factory.mktemp("export") / "model.onnx")
    assert main(["export", run_dir, "--format", "onnx", "--output", onnx_path]) == 0
    return run_dir, onnx_path, os.path.join(category_dir, "test")


@pytest.fixture(scope="module")
def torch_predictor(exported):
    return Predictor.from_run(exported[0])


def _images(folder: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files)


def test_sidecar_describes_graph_preprocessing_and_threshold(exported):
    run_dir, onnx_path, _ = exported
    meta = json.load(open(onnx_path[:-5] + ".json"))
    ckpt = load_safe(os.path.join(run_dir, "model.pt"))
    assert meta["fastflow_version"] == __version__ and meta["onnx_file"] == "model.onnx"
    assert [i["name"] for i in meta["inputs"]] == ["image"]
    assert [o["name"] for o in meta["outputs"]] == ["score", "anomaly_map"]
    assert meta["inputs"][0]["shape"] == ["batch", 3, 64, 64]
    for key in ("input_size", "mean", "std", "resize"):
        assert meta["preprocess"][key] == ckpt["preprocess"][key]
    assert meta["threshold"]["value"] == pytest.approx(ckpt["threshold"]["value"])
    assert meta["threshold"]["val_median"] == pytest.approx(ckpt["threshold"]["val_median"])
    assert meta["parity"]["max_abs_diff_map"] < TOL


def test_sidecar_steps_name_the_contrast_stretch_when_the_model_uses_it(exported):
    from fastflow.export import preprocess_steps

    meta = json.load(open(exported[1][:-5] + ".json"))
    assert meta["preprocess"]["autocontrast"] is None and "contrast" not in meta["preprocess"]["steps"]
    steps = preprocess_steps({**meta["preprocess"], "autocontrast": 1.0})
    assert "1% of the pixels" in steps and steps.index("contrast") < steps.index("resize")
    steps = preprocess_steps({**meta["preprocess"], "equalize": True})
    assert "equalise the histogram" in steps and steps.index("equalise") < steps.index("resize")


def test_graph_has_named_io_dynamic_batch_and_no_threshold(exported):
    import onnx

    _, onnx_path, _ = exported
    graph = onnx.load(onnx_path).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in graph.input] == [("image", ["batch", 3, 64, 64])]
    assert [(v.name, dims(v)) for v in graph.output] == [("score", ["batch"]),
                                                         ("anomaly_map", ["batch", 1, 64, 64])]
    # The decision is not baked in: no comparison node in the graph.
    assert not {"Greater", "Less", "GreaterOrEqual"} & {n.op_type for n in graph.node}


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runtime_matches_torch_on_real_images(exported, torch_predictor, batch):
    _, onnx_path, test_dir = exported
    images = _images(test_dir)[:batch]
    torch_pred = torch_predictor
    x = torch.stack([torch_pred.preprocess(Image.open(p)) for p in images]).numpy()
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    score, amap = session.run(["score", "anomaly_map"], {"image": x})
    assert score.shape == (batch,) and amap.shape == (batch, 1, 64, 64)
    ref_score, ref_map = torch_pred.infer(x)
    np.testing.assert_allclose(amap, ref_map, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(score, ref_score, rtol=TOL, atol=TOL)


def test_predict_with_onnx_runtime(exported, torch_predictor, tmp_path):
    run_dir, onnx_path, test_dir = exported
    images = _images(test_dir)[:3]
    via_onnx = Predictor.from_run(run_dir, runtime="onnx", onnx_path=onnx_path).predict(images)
    via_torch = torch_predictor.predict(images)
    for a, b in zip(via_onnx, via_torch):
        assert a.score == pytest.approx(b.score, rel=TOL, abs=TOL) and a.is_anomalous == b.is_anomalous
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=TOL, atol=TOL)
    out = tmp_path / "out"
    assert main(["predict", run_dir, *images, "--output", str(out), "--runtime", "onnx", "--onnx", onnx_path,
                 "--quiet"]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["runtime"] == "onnx" and summary["counts"]["ok"] == 3
    assert summary["threshold"]["source"] == "calibrated"
    assert summary["threshold"]["value"] == pytest.approx(torch_predictor.threshold)


def test_vit_backbone_and_blur_export(tmp_path):
    """The ViT path (timm forward_intermediates) and the reflect-padded blur trace into ONNX."""
    import timm

    from fastflow.backbones import BackboneSpec, FeatureExtractor
    from fastflow.export import ScoreAndMap, _export, check_parity
    from fastflow.model import FastFlow

    torch.manual_seed(0)
    spec = BackboneSpec("vit_tiny", "vit_tiny_patch16_224", "vit", (1,))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2)
    model = FastFlow(ModelConfig("deit_base_distilled_patch16_384", (64, 64), flow_steps=2, hidden_ratio=0.16,
                                 smoothing_sigma=4.0), backbone=FeatureExtractor(spec, vit)).eval()
    path = str(tmp_path / "vit.onnx")
    _export(ScoreAndMap(model), torch.randn(2, 3, 64, 64), path, 18, "torchscript")
    assert check_parity(path, model, batch=3)["max_abs_diff_map"] < TOL


def test_level_roles_export_with_the_score_from_their_own_levels(tmp_path):
    """A model whose map and image score come from different levels (lite0_unaligned_fine's design) exports
    both outputs; the score is not the map's max, so a graph that got it from the map would fail here."""
    from fastflow.export import ScoreAndMap, _export, check_parity
    from fastflow.model import FastFlow

    torch.manual_seed(0)
    model = FastFlow(ModelConfig(input_size=(64, 64), levels=(2, 3, 4), map_levels=(2, 3), score_levels=(4,),
                                 flow_steps=2, hidden_ratio=0.5, norm_affine=False), weights="random").eval()
    path = str(tmp_path / "roles.onnx")
    _export(ScoreAndMap(model), torch.randn(2, 3, 64, 64), path, 18, "torchscript")
    parity = check_parity(path, model, batch=3)
    assert parity["max_abs_diff_map"] < TOL and parity["max_abs_diff_score"] < TOL, parity
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert not torch.allclose(out.score, out.anomaly_map.flatten(1).amax(1))


def test_border_offsets_export_as_a_constant_map(tmp_path):
    """A map with a border correction (ModelConfig.border_offsets, set by the map choice) exports as the same map:
    the offsets are one constant of the graph, and the image score from the map is the corrected map's max."""
    from fastflow.export import ScoreAndMap, _export, check_parity
    from fastflow.model import FastFlow

    torch.manual_seed(0)
    offsets = tuple(float(v) for v in np.linspace(2.0, -0.5, 32))
    model = FastFlow(ModelConfig(input_size=(64, 64), levels=(2, 3), flow_steps=2, hidden_ratio=0.5,
                                 norm_affine=False, border_offsets=offsets), weights="random").eval()
    path = str(tmp_path / "border.onnx")
    _export(ScoreAndMap(model), torch.randn(2, 3, 64, 64), path, 18, "torchscript")
    parity = check_parity(path, model, batch=3)
    assert parity["max_abs_diff_map"] < TOL and parity["max_abs_diff_score"] < TOL, parity
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        model.set_border_offsets(None)
        plain = model(x)
    assert out.anomaly_map[0, 0, 0, 0] == pytest.approx(float(plain.anomaly_map[0, 0, 0, 0]) - 2.0, abs=1e-5)
    torch.testing.assert_close(out.score, out.anomaly_map.flatten(1).amax(1))


def test_dynamo_exporter_smoke(tmp_path):
    """The torch.export-based exporter on a tiny model: it traces the reference flow (no version or
    storage caches left to trip over fake tensors) and ONNX Runtime agrees with torch."""
    pytest.importorskip("onnxscript")
    from fastflow.export import ScoreAndMap, _export, check_parity
    from fastflow.model import FastFlow

    torch.manual_seed(0)
    model = FastFlow(ModelConfig(input_size=(32, 32), flow_steps=2), weights="random").eval()
    path = str(tmp_path / "dynamo.onnx")
    _export(ScoreAndMap(model), torch.randn(2, 3, 32, 32), path, 18, "dynamo")
    assert check_parity(path, model, batch=3)["max_abs_diff_map"] < TOL
