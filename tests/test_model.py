"""The FastFlow model: shapes, anomaly maps, training behaviour, presets and parameter counts."""

import json
import math

import pytest
import torch

from fastflow.cli import main
from fastflow.config import ModelConfig
from fastflow.model import FastFlow


@pytest.fixture(scope="module")
def lite0():
    torch.manual_seed(0)
    return FastFlow(ModelConfig(input_size=(96, 96)), weights="pretrained")


def test_outputs_have_documented_shapes(lite0):
    out = lite0(torch.randn(2, 3, 96, 96))
    assert [tuple(z.shape) for z in out.z] == [(2, 24, 24, 24), (2, 40, 12, 12), (2, 112, 6, 6)]
    assert [tuple(ld.shape) for ld in out.log_det_maps] == [(2, 24, 24), (2, 12, 12), (2, 6, 6)]
    assert out.anomaly_map.shape == (2, 1, 96, 96) and out.score.shape == (2,)
    torch.testing.assert_close(out.score, out.anomaly_map.flatten(1).amax(1))
    assert out.loss.ndim == 0 and 0.5 < out.nll_per_dim.item() < 10  # nats per dimension: readable


def test_training_forward_skips_the_map_only(lite0):
    with torch.no_grad():
        feats = lite0.extract(torch.randn(2, 3, 96, 96))
        full = lite0.forward_features(feats)
        lean = lite0.forward_features(feats, with_map=False)
    assert lean.anomaly_map is None and lean.score is None
    assert torch.equal(lean.loss, full.loss) and all(torch.equal(a, b) for a, b in zip(lean.z, full.z))


@pytest.mark.parametrize("size", [(100, 100), (90, 130)])
def test_sizes_not_multiple_of_32_work(size):
    model = FastFlow(ModelConfig(input_size=size), weights="random")
    out = model(torch.randn(1, 3, *size))
    assert out.anomaly_map.shape[-2:] == size


def test_reference_map_is_peers_formula(lite0):
    model = FastFlow(ModelConfig(input_size=(96, 96), anomaly_map="reference", smoothing_sigma=0),
                     backbone=lite0.backbone)
    out = model(torch.randn(1, 3, 96, 96))
    expected = torch.stack([torch.nn.functional.interpolate(
        -torch.exp(-0.5 * z.pow(2).mean(1, keepdim=True)), size=(96, 96), mode="bilinear", align_corners=False)
        for z in out.z]).mean(0)
    torch.testing.assert_close(out.anomaly_map, expected)
    assert out.anomaly_map.max().item() <= 0


def test_loglik_map_includes_log_det(lite0):
    model = FastFlow(ModelConfig(input_size=(96, 96), smoothing_sigma=0), backbone=lite0.backbone)
    out = model(torch.randn(1, 3, 96, 96))
    z, ld = out.z[2], out.log_det_maps[2]
    nll = (0.5 * z.pow(2).sum(1) - ld) / z.shape[1] + 0.5 * math.log(2 * math.pi)
    level = model.anomaly_map([z], [ld], (6, 6))
    torch.testing.assert_close(level[:, 0], nll)


def test_one_step_lowers_loss_and_backbone_is_untouched(lite0):
    torch.manual_seed(1)
    model = FastFlow(ModelConfig(input_size=(64, 64)), backbone=lite0.backbone)
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    x = torch.randn(4, 3, 64, 64)
    first = model(x)
    assert all(torch.isfinite(z).all() for z in first.z) and torch.isfinite(first.loss)
    first.loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model(x).loss.item() < first.loss.item()
    for k, v in model.backbone.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(v, bn_before[k])
    assert not model.backbone.training


def test_generate_is_the_exact_inverse(lite0):
    model = FastFlow(ModelConfig(input_size=(64, 64)), backbone=lite0.backbone).eval()
    feats = [n(f) for n, f in zip(model.norms, model.extract(torch.randn(1, 3, 64, 64)))]
    with torch.no_grad():
        zs = [flow(f)[0] for flow, f in zip(model.flows, feats)]
    for back, f in zip(model.generate(zs), feats):
        torch.testing.assert_close(back, f, atol=1e-4, rtol=1e-4)  # float32 round-off through 8 steps


REFERENCE_COUNTS = {  # trainable parameters of the reference implementation at the paper presets
    "resnet18": 5_574_912,  # 3-3 at 256, LayerNorm included
    "wide_resnet50_2": 45_007_872,  # 3-1 at 256, LayerNorm included
    "deit": 7_074_500,  # 20 steps, ratio 0.16; ViTs use the backbone's own (frozen) final norm
    "cait": 7_074_500,
}


def test_presets_json_reports_reference_parameter_counts(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    for name, count in REFERENCE_COUNTS.items():
        assert rows[name]["params_trainable"] == count, name
    assert rows["resnet18"]["kernels"] == "3-3" and rows["wide_resnet50_2"]["kernels"] == "3-1"
    assert rows["deit"]["levels"][0]["shape"] == [768, 24, 24]
    assert rows["cait"]["levels"][0]["shape"] == [768, 28, 28]
    assert [lv["stride"] for lv in rows["efficientnet_lite0"]["levels"]] == [4, 8, 16]
    unaligned = rows["lite0_unaligned"]  # the stride-32 level alone, 3x3 kernels, ratio 2.0, no LayerNorm affine
    assert [lv["stride"] for lv in unaligned["levels"]] == [32] and unaligned["kernels"] == "3-3"
    assert unaligned["hidden_ratio"] == 2.0 and unaligned["params_norm"] == 0
    assert unaligned["map_levels"] is None and unaligned["score_levels"] is None
    fine = rows["lite0_unaligned_fine"]  # its stride-32 flow scores the image, the stride-8 and -16 flows map
    assert [lv["stride"] for lv in fine["levels"]] == [8, 16, 32]
    assert fine["map_levels"] == [2, 3] and fine["score_levels"] == [4]
    assert fine["params_trainable"] == unaligned["params_trainable"] + rows["lite0_texture"]["params_trainable"]
    assert main(["presets"]) == 0
    assert "lite0_unaligned_fine: the map from stride 8, 16, the image score from stride 32" in capsys.readouterr().out


def test_levels_choose_the_flows_and_survive_serialisation():
    import argparse

    from fastflow.cli import _levels
    from fastflow.config import from_dict, to_dict

    cfg = ModelConfig(input_size=(64, 64), levels=[1, 2])
    assert cfg.levels == (1, 2)
    model = FastFlow(cfg, weights="random")
    assert len(model.flows) == 2 and [s[0] for s in model.feature_shapes] == [24, 40]
    assert model(torch.randn(1, 3, 64, 64)).anomaly_map.shape == (1, 1, 64, 64)
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    assert from_dict(ModelConfig, {k: v for k, v in to_dict(ModelConfig()).items() if k != "levels"}).levels is None
    with pytest.raises(ValueError, match="levels"):
        ModelConfig(levels=(2, 1))
    assert _levels("1,2") == (1, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="levels"):
        _levels("2,1")


def test_level_roles_map_from_some_levels_and_score_from_others():
    from fastflow.config import from_dict, to_dict

    base = dict(input_size=(64, 64), flow_steps=2, norm_affine=False, smoothing_sigma=2.0)
    torch.manual_seed(0)
    roles = FastFlow(ModelConfig(levels=(1, 2, 3), map_levels=(1, 2), score_levels=(3,), **base), weights="random")
    fine = FastFlow(ModelConfig(levels=(1, 2), **base), weights="random")  # the map levels alone
    deep = FastFlow(ModelConfig(levels=(3,), **base), weights="random")  # the score level alone
    for i in range(2):
        fine.flows[i].load_state_dict(roles.flows[i].state_dict())
    deep.flows[0].load_state_dict(roles.flows[2].state_dict())
    feats = roles.extract(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        out, f, d = roles.forward_features(feats), fine.forward_features(feats[:2]), deep.forward_features(feats[2:])
    torch.testing.assert_close(out.anomaly_map, f.anomaly_map)  # the map: levels 1 and 2 only
    torch.testing.assert_close(out.score, d.score)  # the score: level 3's own map, not the map's max
    assert not torch.allclose(out.score, f.score)
    torch.testing.assert_close(out.loss, f.loss + d.loss)  # every level is trained all the same
    cfg = roles.config
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="subset of levels"):
        ModelConfig(levels=(2, 3), map_levels=(4,))
    with pytest.raises(ValueError, match="subset of levels"):
        ModelConfig(score_levels=(4,))  # levels left to the backbone's default


@pytest.mark.parametrize("shape,sigma", [((2, 1, 64, 48), 4.0), ((1, 1, 5, 40), 8.0), ((1, 1, 1, 7), 2.0)])
def test_gaussian_blur_equals_the_reflect_padded_separable_convolution(shape, sigma):
    """The matrix form of the blur gives what its definition (pad, convolve rows, then columns) gives."""
    import torch.nn.functional as F

    from fastflow.model import gaussian_blur

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    radius = max(1, int(4 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    ref = x.double()
    for dim in (2, 3):
        pad = min(radius, shape[dim] - 1)
        kk = k[radius - pad: radius + pad + 1]
        kk = kk / kk.sum()
        if dim == 2:
            ref = F.conv2d(F.pad(ref, (0, 0, pad, pad), mode="reflect"), kk.view(1, 1, -1, 1))
        else:
            ref = F.conv2d(F.pad(ref, (pad, pad, 0, 0), mode="reflect"), kk.view(1, 1, 1, -1))
    out = gaussian_blur(x, sigma)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, x, atol=1e-3) or shape[2] * shape[3] == 1  # it does blur


@pytest.mark.parametrize("kind,sigma,size", [("loglik", 8.0, (96, 96)), ("reference", 4.0, (80, 112)), ("loglik", 0.0, (50, 70))])
def test_map_operators_equal_upsample_mean_and_blur(kind, sigma, size):
    """The map's one-product-per-axis form gives what its definition gives: each level's map upsampled
    with F.interpolate, the mean over levels, then the Gaussian blur."""
    import torch.nn.functional as F

    from fastflow.model import LOG_2PI, gaussian_blur

    model = FastFlow(ModelConfig(input_size=size, anomaly_map=kind, smoothing_sigma=sigma, flow_steps=2), weights="random")
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 24, 24, 28), (2, 40, 12, 14), (2, 112, 6, 7)]
    zs = [torch.randn(s, generator=g) for s in shapes]
    lds = [torch.randn(s[0], s[2], s[3], generator=g) for s in shapes]
    levels = []
    for z, ld in zip(zs, lds):
        if kind == "reference":
            level = -torch.exp(-0.5 * z.pow(2).mean(dim=1, keepdim=True))
        else:
            level = ((0.5 * z.pow(2).sum(dim=1) - ld) / z.shape[1] + 0.5 * LOG_2PI).unsqueeze(1)
        levels.append(F.interpolate(level, size=size, mode="bilinear", align_corners=False))
    want = torch.stack(levels).mean(0)
    if sigma > 0:
        want = gaussian_blur(want, sigma)
    got = model.anomaly_map(zs, lds, size)
    assert got.shape == (2, 1, *size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_map_operators_are_cached_as_read_only_numpy_arrays_not_device_tensors():
    # Module-level caches hold float64 NumPy matrices (no tensor per device for the life of the process);
    # each call converts them to the input's dtype and device.
    import numpy as np

    from fastflow import model as model_module

    for m in (model_module.blur_matrix(9, 2.0), model_module.upsample_blur_matrix(4, 9, 2.0),
              model_module._right_matrix(((4, 0.5), (2, 0.5)), 9, 2.0)):
        assert isinstance(m, np.ndarray) and m.dtype == np.float64 and not m.flags.writeable
    x = torch.randn(1, 1, 9, 9, dtype=torch.float64)
    assert gaussian_blur_dtype(x) == torch.float64


def gaussian_blur_dtype(x):
    from fastflow.model import gaussian_blur

    return gaussian_blur(x, 2.0).dtype
