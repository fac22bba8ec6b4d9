"""Training loop, checkpoints and the train/evaluate CLI on tiny synthetic data (MVTec layout, CIFAR-10)."""

import json
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.cli import main
from fastflow.config import DEFAULT_PRESET, ModelConfig, TrainConfig, from_dict, get_preset, to_dict
from fastflow.data import load_samples
from fastflow.demo import make_demo_dataset
from fastflow.flow import use_fast_backward
from fastflow.model import FastFlow
from fastflow.checkpoint import load_safe
from fastflow.run import load_run
from fastflow.train import add_feature_noise, split_validation, train

TINY = ["--input-size", "64", "--epochs", "2", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_demo_dataset(str(root), n_train=10, n_test_good=3, n_test_defect=4)
    return str(root)


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "texture"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), *TINY]) == 0
    return str(out)


def test_train_writes_a_self_describing_run(run):
    model, ckpt = load_run(run)
    assert ckpt["model_config"]["input_size"] == [64, 64]
    assert ckpt["preprocess"]["mean"] == [0.5, 0.5, 0.5]  # EfficientNet-Lite expects [-1, 1]
    assert ckpt["train_config"]["epochs"] == 2 and ckpt["version"]
    assert ckpt["train_config"]["feature_noise"] == 0.2  # the lite preset's noise regularisation
    assert np.isfinite(ckpt["threshold"]["value"]) and ckpt["threshold"]["n_val"] == 2  # 10 images: a fifth
    history = json.load(open(f"{run}/history.json"))
    assert len(history["history"]) == 2 and all(np.isfinite(r["train_nll"]) for r in history["history"])


def _tiny_train(dataset, run_dir, **train_overrides):
    cfg = TrainConfig(epochs=1, batch_size=4, val_fraction=0.3, **train_overrides)
    return train(ModelConfig(input_size=(64, 64)), cfg, load_samples("mvtec", dataset, "texture", "train"),
                 str(run_dir), progress=False, log=lambda *a: None)


def test_checkpoint_round_trip_gives_the_trained_model(dataset, tmp_path, monkeypatch):
    # The model train() selected (caught where it calibrates the threshold) against the one load_run
    # rebuilds from model.pt: the same parameters and buffers, the same outputs.
    import copy

    import fastflow.train as train_module

    trained = {}
    calibrate = train_module.calibrate_threshold
    monkeypatch.setattr(train_module, "calibrate_threshold",
                        lambda model, *a: trained.setdefault("model", copy.deepcopy(model)) and calibrate(model, *a))
    _tiny_train(dataset, tmp_path / "run")
    loaded, _ = load_run(str(tmp_path / "run"))
    want = use_fast_backward(trained["model"], False).eval()  # the trainer's fast form -> the reference
    state, want_state = loaded.state_dict(), want.state_dict()
    assert state.keys() == want_state.keys()
    for key in want_state:
        assert torch.equal(state[key], want_state[key]), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        oa, ob = loaded(x), want(x)
    assert torch.equal(oa.anomaly_map, ob.anomaly_map) and torch.equal(oa.score, ob.score)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in loaded.flows.parameters())


def test_a_training_not_saved_every_epoch_saves_its_last_state_only(dataset, tmp_path, monkeypatch):
    """``save_every_epoch=False`` (auto.py's probes) writes checkpoint.pt once, after the last epoch, and that state
    is the one a run saved every epoch ends with."""
    import fastflow.train as train_module

    saved = []
    save = train_module._save_training_state
    monkeypatch.setattr(train_module, "_save_training_state", lambda loop, epoch: saved.append(epoch) or save(loop, epoch))
    samples = load_samples("mvtec", dataset, "texture", "train")
    cfg = TrainConfig(epochs=3, batch_size=4, val_fraction=0.3)
    for folder, every in (("every", True), ("last", False)):
        train(ModelConfig(input_size=(64, 64)), cfg, samples, str(tmp_path / folder), progress=False,
              log=lambda *a: None, save_every_epoch=every)
    assert saved == [0, 1, 2, 2]
    a, b = (load_safe(str(tmp_path / f / "checkpoint.pt")) for f in ("every", "last"))
    assert a["epoch"] == b["epoch"] == 2 and a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key


def test_the_choices_after_training_run_without_the_training_state(dataset, tmp_path, monkeypatch):
    """The training features, gradients and Adam moments are freed after the last epoch, before the choices after
    training (their synthetic set is the memory peak), and checkpoint.pt still holds the optimiser state."""
    import fastflow.train as train_module

    seen = {}
    select = train_module._select_best

    def spy(loop, *args):
        seen.update(features=loop.fit.cached, moments=len(loop.opt.state),
                    grads=[p.grad for p in loop.params if p.grad is not None])
        return select(loop, *args)

    monkeypatch.setattr(train_module, "_select_best", spy)
    _tiny_train(dataset, tmp_path / "run")
    assert seen == {"features": None, "moments": 0, "grads": []}
    assert load_safe(str(tmp_path / "run" / "checkpoint.pt"))["optimizer"]["state"]  # saved before it was freed


def test_training_leaves_the_callers_random_state_alone(dataset, tmp_path):
    torch.manual_seed(123)
    np.random.seed(123)
    want = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    _tiny_train(dataset, tmp_path / "run", seed=7)
    got = torch.rand(3), np.random.rand(3)
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_validation_nll_nan_at_every_epoch_is_a_clear_training_error(dataset, tmp_path, monkeypatch):
    import fastflow.train as train_module
    from fastflow.train import TrainingError

    monkeypatch.setattr(train_module, "_mean_nll", lambda model, source: [float("nan")] * len(model.flows))
    with pytest.raises(TrainingError, match="validation NLL was not finite"):
        _tiny_train(dataset, tmp_path / "run")


@pytest.mark.parametrize("keep, nlls, kept", [("best", [0.5, 0.2, 0.4, 0.3], 2), ("last", [0.5, 0.2, 0.4, 0.3], 4),
                                              ("last", [0.5, 0.2, 0.4, float("nan")], 3),
                                              ("last", [0.5, 0.2, 0.6, 0.75], 3)])
def test_keep_epoch_keeps_the_lowest_held_out_nll_or_the_last_sound_epoch(dataset, tmp_path, monkeypatch, keep,
                                                                          nlls, kept):
    import fastflow.train as train_module

    script, weights = iter(nlls), []  # weights[e - 1]: the model as epoch e was validated

    def scripted_nll(model, source):
        weights.append({k: v.detach().clone() for k, v in train_module.trainable_state(model).items()})
        return [next(script)] * len(model.flows)  # every flow alike: one epoch for all

    monkeypatch.setattr(train_module, "_mean_nll", scripted_nll)
    samples = load_samples("mvtec", dataset, "texture", "train")
    tcfg = TrainConfig(epochs=4, batch_size=4, keep_epoch=keep)
    result = train(ModelConfig(input_size=(64, 64)), tcfg, samples, str(tmp_path / "run"), progress=False,
                   log=lambda *_: None)
    assert result.best_epoch == kept and len(weights) == 4
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["state"]
    assert all(torch.equal(saved[k], weights[kept - 1][k].to(saved[k].device)) for k in weights[kept - 1])
    with pytest.raises(ValueError, match="keep_epoch"):
        TrainConfig(keep_epoch="first")
    with pytest.raises(ValueError, match="keep_last_within"):
        TrainConfig(keep_last_within=-1.0)


@pytest.mark.parametrize("keep, per_flow, kept", [
    ("best", [[0.5, 0.2, 0.4, 0.3], [0.5, 0.4, 0.3, 0.2], [0.3, 0.2, 0.1, 0.4]], [2, 4, 3]),
    # the lite presets' rule: flow 3 overfits from epoch 3 on; the others keep the last epoch all the same
    ("last", [[0.5, 0.2, 0.4, 0.3], [0.5, 0.4, 0.3, 0.2], [0.1, 0.2, 0.9, 5.0]], [4, 4, 2])])
def test_each_flow_keeps_its_own_epoch(dataset, tmp_path, monkeypatch, keep, per_flow, kept):
    import fastflow.train as train_module

    weights, epoch = [], iter(range(4))

    def scripted_nll(model, source):
        weights.append({k: v.detach().clone() for k, v in train_module.trainable_state(model).items()})
        e = next(epoch)
        return [levels[e] for levels in per_flow]

    monkeypatch.setattr(train_module, "_mean_nll", scripted_nll)
    samples = load_samples("mvtec", dataset, "texture", "train")
    tcfg = TrainConfig(epochs=4, batch_size=4, keep_epoch=keep)
    result = train(ModelConfig(input_size=(64, 64)), tcfg, samples, str(tmp_path / "run"), progress=False,
                   log=lambda *_: None)
    assert result.kept_epochs == kept and result.best_epoch == max(kept)
    assert result.best_val_nll == pytest.approx(sum(levels[e - 1] for levels, e in zip(per_flow, kept)))
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert saved["kept_epochs"] == kept
    for key, value in saved["state"].items():  # each flow and its norm from its own kept epoch
        level = int(key.split(".")[1])
        assert torch.equal(value, weights[kept[level] - 1][key].to(value.device)), key
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["kept_epochs"] == kept and len(history["history"][0]["val_nll_levels"]) == 3


@pytest.mark.parametrize("logdet", [False, True])
def test_flow_nlls_are_shares_of_the_model_nll(logdet):
    """``level_nll`` splits ``nll_per_dim`` exactly (with the norms' Jacobian too): the per-flow choice compares
    the quantity the model trains."""
    model = FastFlow(ModelConfig(input_size=(64, 64), norm_logdet=logdet), weights="random")
    with torch.no_grad():
        for norm in model.norms:
            norm.weight.uniform_(0.5, 2.0)
    out = model.forward_features([torch.randn(2, *s) for s in model.feature_shapes], with_map=False)
    assert out.level_nll.shape == (3,) and torch.allclose(out.level_nll.sum(), out.nll_per_dim)


def test_train_config_of_an_older_run_loads_without_its_retired_fields():
    saved = {**to_dict(TrainConfig(epochs=7)), "num_workers": 0}  # what runs before its removal saved
    assert from_dict(TrainConfig, saved) == TrainConfig(epochs=7)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        from_dict(TrainConfig, {**saved, "nonsense": 1})


def test_evaluate_cli_writes_metrics_json(run, dataset, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", run, "--data", dataset, "--category", "texture", "--output", str(out), "--quiet"]) == 0
    m = json.loads(out.read_text())
    # The CLI's numbers are the metrics of the run's own scores and maps (recomputed here through the API,
    # image AUROC independently with scikit-learn), not merely numbers in [0, 1].
    from sklearn.metrics import roc_auc_score

    from fastflow.data import Preprocess
    from fastflow.evaluate import evaluate_model

    model, ckpt = load_run(run)
    want, scored = evaluate_model(model, load_samples("mvtec", dataset, "texture", "test"),
                                  Preprocess.from_dict(ckpt["preprocess"]))
    assert m["image_auroc"] == pytest.approx(roc_auc_score(scored.labels, scored.scores), abs=1e-12)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max"):
        assert m[key] == pytest.approx(want[key], abs=1e-9), key
    assert m["n_images"] == 7 and m["n_anomalous"] == 4 and m["seconds"] > 0
    assert "image_auroc" in capsys.readouterr().out  # the readable table


def test_validation_is_held_out_from_training_images_only(dataset):
    samples = load_samples("mvtec", dataset, "texture", "train")
    fit, val = split_validation(samples, 0.1, seed=0)
    assert len(val) == 1 and len(fit) == 9 and not {s.path for s in fit} & {s.path for s in val}
    assert all(s.label == 0 for s in samples) and split_validation(samples, 0.1, 0) == (fit, val)


def test_small_sets_hold_out_a_floor_of_images_but_at_most_a_fifth():
    from fastflow.data.samples import Sample

    samples = lambda n: [Sample(f"img{i:03d}.png", 0, "good", None) for i in range(n)]
    held = lambda n, fraction=0.1, minimum=8: len(split_validation(samples(n), fraction, 3, minimum)[1])
    assert [held(n) for n in (5, 10, 20, 40, 47, 79, 80, 200)] == [1, 2, 4, 8, 8, 8, 8, 20]
    assert [held(n, minimum=0) for n in (10, 40, 47)] == [1, 4, 5]  # 0: the fraction alone
    assert held(40, fraction=0.0) == 0  # no hold-out asked for: none, whatever the floor
    forty = samples(40)
    small, large = split_validation(forty, 0.1, 3)[1], split_validation(forty, 0.1, 3, 8)[1]
    assert {s.path for s in small} < {s.path for s in large}  # the floor adds images to the same draw
    assert TrainConfig().val_min == 8 and get_preset("efficientnet_lite0").train.val_min == 8
    with pytest.raises(ValueError, match="val_min"):
        TrainConfig(val_min=-1)


def test_feature_cache_gives_the_same_model(dataset, tmp_path):
    samples = load_samples("mvtec", dataset, "texture", "train")
    cfg = ModelConfig(input_size=(64, 64))
    states = []
    for cache in (True, False):
        res = train(cfg, TrainConfig(epochs=2, batch_size=4, cache_features=cache), samples,
                    str(tmp_path / f"cache{cache}"), progress=False, log=lambda *_: None)
        states.append(torch.load(f"{res.run_dir}/model.pt", weights_only=True)["state"])
    for key in states[0]:
        # Same images, same order, same maths; batching the backbone differently may change the last
        # float32 bits of its features, hence a tolerance rather than bit equality.
        torch.testing.assert_close(states[0][key], states[1][key], rtol=1e-4, atol=1e-5)


def test_same_seed_same_model(dataset, tmp_path):
    samples = load_samples("mvtec", dataset, "texture", "train")
    cfg, tcfg = ModelConfig(input_size=(64, 64)), TrainConfig(epochs=1, batch_size=4, seed=3)
    a = train(cfg, tcfg, samples, str(tmp_path / "a"), progress=False, log=lambda *_: None)
    b = train(cfg, tcfg, samples, str(tmp_path / "b"), progress=False, log=lambda *_: None)
    sa = torch.load(f"{a.run_dir}/model.pt", weights_only=True)["state"]
    sb = torch.load(f"{b.run_dir}/model.pt", weights_only=True)["state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_python_train_with_a_preset_and_the_cli_give_the_same_model(dataset, tmp_path):
    # Issue 18: `train(get_preset(...))` and `fastflow train --backbone ...` (same options, same seed) train the
    # same model: equal configs, bit-equal weights, equal thresholds. And with no config, train() trains the
    # preset the CLI's --backbone default names.
    cli_run = tmp_path / "cli"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(cli_run),
                 "--backbone", "efficientnet_lite0", "--seed", "3", *TINY]) == 0
    preset = get_preset("efficientnet_lite0")
    assert preset.name == DEFAULT_PRESET
    preset = replace(preset, model=replace(preset.model, input_size=(64, 64)),
                     train=replace(preset.train, epochs=2, steps=None, batch_size=4, seed=3))
    assert preset.model == ModelConfig.from_preset(input_size=64)  # the same configs, however written
    assert preset.train == TrainConfig.from_preset(epochs=2, batch_size=4, seed=3)
    res = train(preset, samples=load_samples("mvtec", dataset, "texture", "train"), run_dir=str(tmp_path / "py"),
                progress=False, log=lambda *_: None)
    saved = json.load(open(cli_run / "run.json"))
    assert saved["model_config"] == to_dict(preset.model) and saved["train_config"] == to_dict(preset.train)
    (_, by_cli), (_, by_api) = load_run(str(cli_run)), load_run(res.run_dir)
    assert by_cli["model_config"] == by_api["model_config"] and by_cli["train_config"] == by_api["train_config"]
    assert by_cli["preprocess"] == by_api["preprocess"]
    assert by_cli["state"].keys() == by_api["state"].keys()
    assert all(torch.equal(by_cli["state"][k], by_api["state"][k]) for k in by_cli["state"])
    assert by_cli["threshold"] == by_api["threshold"] and res.threshold == by_cli["threshold"]["value"]


def test_feature_noise_is_relative_to_each_levels_scale():
    torch.manual_seed(0)
    feats = [3.0 + 5.0 * torch.randn(64, 8, 16, 16), 0.01 * torch.randn(64, 32, 4, 4)]
    keys = list(range(100, 164))
    noisy = add_feature_noise(feats, 0.2, keys)
    for f, g in zip(feats, noisy):
        assert g.shape == f.shape and not torch.equal(f, g)
        rel = (g - f) / f.std(dim=(1, 2, 3), keepdim=True)
        assert abs(float(rel.std()) - 0.2) < 0.01 and abs(float(rel.mean())) < 0.01
    # An image's noise depends on its key only: not on the global RNG, nor on the rest of the batch.
    torch.manual_seed(123)
    part = add_feature_noise([f[5:7] for f in feats], 0.2, keys[5:7])
    assert all(torch.equal(a[5:7], b) for a, b in zip(noisy, part))
    with pytest.raises(ValueError, match="feature_noise"):
        TrainConfig(feature_noise=-0.1)


def test_feature_noise_regularises_training_reproducibly(dataset, tmp_path):
    samples = load_samples("mvtec", dataset, "texture", "train")
    cfg = ModelConfig(input_size=(64, 64), flow_steps=2)
    states = {}
    for name, noise in (("a", 0.5), ("b", 0.5), ("off", 0.0)):
        res = train(cfg, TrainConfig(epochs=1, batch_size=4, feature_noise=noise), samples,
                    str(tmp_path / name), progress=False, log=lambda *_: None)
        states[name] = torch.load(f"{res.run_dir}/model.pt", weights_only=True)["state"]
    assert all(torch.equal(states["a"][k], states["b"][k]) for k in states["a"])  # same seed, same noise
    assert any(not torch.allclose(states["a"][k], states["off"][k]) for k in states["a"])  # noise is used
    # The CLI flag reaches the saved training config.
    out = tmp_path / "cli"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--flow-steps", "1",
                 "--feature-noise", "0", *TINY]) == 0
    assert load_run(str(out))[1]["train_config"]["feature_noise"] == 0.0


def test_no_norm_affine_gives_a_position_free_model_that_round_trips(dataset, tmp_path):
    out = tmp_path / "free"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--flow-steps", "1",
                 "--no-norm-affine", *TINY]) == 0
    model, ckpt = load_run(str(out))
    assert ckpt["model_config"]["norm_affine"] is False
    assert model.parameter_counts()["norm"] == 0 and not any(k.startswith("norms.") for k in ckpt["state"])
    assert all(not n.elementwise_affine for n in model.norms)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        a = model(x).score
        b = load_run(str(out))[0](x).score
        # position-free up to the backbone: the same features shifted give the same per-location NLL
        feats = model.extract(x)
        shifted = [torch.roll(f, 1, dims=3) for f in feats]
        flows_only = lambda fs: [fl.forward_map(n(f)) for f, n, fl in zip(fs, model.norms, model.flows)]
    torch.testing.assert_close(a, b)
    for (z, ld), (zs, lds) in zip(flows_only(feats), flows_only(shifted)):
        # away from the borders (zero padding), rolling the input rolls the log-det map
        torch.testing.assert_close(torch.roll(ld, 1, dims=2)[..., 3:-3, 3:-3], lds[..., 3:-3, 3:-3], rtol=1e-4, atol=1e-4)


def test_autocontrast_is_saved_with_the_preprocessing_and_used_to_predict(dataset, tmp_path):
    out = tmp_path / "contrast"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--flow-steps", "1",
                 "--autocontrast", *TINY]) == 0
    ckpt = load_run(str(out))[1]
    assert ckpt["model_config"]["autocontrast"] == 1.0 and ckpt["preprocess"]["autocontrast"] == 1.0
    import fastflow

    predictor = fastflow.Predictor.from_run(str(out))
    assert predictor.preprocess.autocontrast == 1.0
    # the stretch undoes a darkening of the image, so the model scores a dark copy like the image itself
    plain = fastflow.Predictor.from_run(str(out))
    plain.preprocess = replace(plain.preprocess, autocontrast=None)
    gaps = {"on": [], "off": []}
    for sample in load_samples("mvtec", dataset, "texture", "test"):
        image = np.asarray(Image.open(sample.path).convert("RGB"))
        dark = (image.astype(np.float64) * 0.5 + 20).astype(np.uint8)
        assert (predictor.preprocess(image) - predictor.preprocess(dark)).abs().mean() < 0.05  # inputs in [-1, 1]
        for key, p in (("on", predictor), ("off", plain)):
            gaps[key].append(abs(p.predict(image).score - p.predict(dark).score))
    assert np.mean(gaps["on"]) < 0.25 * np.mean(gaps["off"])
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(tmp_path / "bad"),
                 "--autocontrast", "60", *TINY]) == 2


def test_unaligned_preset_reaches_the_checkpoint_and_its_stretch_can_be_switched_off(dataset, tmp_path):
    out = tmp_path / "unaligned"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--backbone",
                 "lite0_unaligned", "--flow-steps", "1", *TINY]) == 0
    model, ckpt = load_run(str(out))
    m, t = ckpt["model_config"], ckpt["train_config"]
    assert m["levels"] == [4] and m["kernels"] == "3-3" and m["hidden_ratio"] == 2.0 and m["norm_affine"] is False
    assert m["autocontrast"] == 1.0 and ckpt["preprocess"]["autocontrast"] == 1.0 and t["feature_noise"] == 0.0
    assert [s[0] for s in model.feature_shapes] == [320] and model.parameter_counts()["norm"] == 0
    out = tmp_path / "unaligned-off"
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--backbone",
                 "lite0_unaligned", "--flow-steps", "1", "--autocontrast", "off", *TINY]) == 0
    assert load_run(str(out))[1]["preprocess"]["autocontrast"] is None
    out = tmp_path / "unaligned-equalize"  # --equalize replaces the preset's stretch
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--backbone",
                 "lite0_unaligned", "--flow-steps", "1", "--equalize", *TINY]) == 0
    pre = load_run(str(out))[1]["preprocess"]
    assert pre["equalize"] is True and pre["autocontrast"] is None
    assert main(["train", "--data", dataset, "--category", "texture", "--output", str(tmp_path / "both"),
                 "--equalize", "--autocontrast", "2", *TINY]) == 2


def _write_cifar(root, per_class=6, seed=0):
    """A tiny folder in the python-pickle format of cifar-10-batches-py: class c is a flat colour c."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(n):
        labels = np.repeat(np.arange(10), n)
        colours = (labels[:, None] * 25 + rng.integers(0, 10, size=(len(labels), 3))).astype(np.uint8)
        data = np.repeat(colours[:, :, None], 1024, axis=2).reshape(len(labels), 3072)
        return {b"data": data, b"labels": labels.tolist()}

    for i in range(1, 6):
        pickle.dump(batch(per_class if i == 1 else 0), open(folder / f"data_batch_{i}", "wb"))
    pickle.dump(batch(2), open(folder / "test_batch", "wb"))
    pickle.dump({b"label_names": [n.encode() for n in names]}, open(folder / "batches.meta", "wb"))
    return folder


def test_cifar10_protocol_end_to_end(tmp_path, capsys):
    data = _write_cifar(tmp_path)
    out = tmp_path / "runs"
    assert main(["train", "--format", "cifar10", "--data", str(data), "--category", "airplane,ship",
                 "--output", str(out), "--input-size", "32", "--epochs", "1", "--batch-size", "4",
                 "--evaluate", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"airplane", "ship", "mean"}
    for cls in ("airplane", "ship"):
        m = json.loads((out / cls / "metrics.json").read_text())
        assert m["n_normal"] == 2 and m["n_anomalous"] == 18 and m["pixel_auroc"] is None
        assert 0 <= m["image_auroc"] <= 1
    assert summary["mean"]["image_auroc"] == pytest.approx(
        np.mean([summary[c]["image_auroc"] for c in ("airplane", "ship")]))
    assert "mean" in capsys.readouterr().out


def test_user_mistakes_are_one_line_errors(dataset, tmp_path, capsys):
    assert main(["train", "--data", dataset, "--category", "nope", "--output", str(tmp_path / "x"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert "nope" in err and "texture" in err and "Traceback" not in err
    assert main(["evaluate", str(tmp_path / "missing"), "--data", dataset, "--category", "texture"]) == 2
    assert "not found" in capsys.readouterr().err


def test_top_level_predictor_api(run):
    import fastflow

    image = np.full((50, 70, 3), 128, np.uint8)
    result = fastflow.Predictor.from_run(run).predict(image)
    assert result.anomaly_map.shape == (50, 70) and isinstance(result.is_anomalous, bool)
    assert np.isfinite(result.score)


def test_fastflow_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys, monkeypatch):
    args = ["evaluate", str(tmp_path / "no-such-run"), "--data", str(tmp_path), "--category", "x"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("FASTFLOW_DEBUG", "1")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("fastflow evaluate")


def test_an_internal_value_error_is_not_disguised_as_a_user_error(monkeypatch):
    import fastflow.cli as cli

    def broken(args):
        np.zeros(-1)  # a ValueError raised inside NumPy: a bug, not the user's mistake

    monkeypatch.setitem(cli.COMMANDS, "presets", broken)
    with pytest.raises(ValueError, match="negative"):
        main(["presets"])

    def user_mistake(args):
        from fastflow.flow import kernel_sizes

        kernel_sizes(2, "5-5")  # a ValueError raised by fastflow's own code, with its message: a user error

    monkeypatch.setitem(cli.COMMANDS, "presets", user_mistake)
    assert main(["presets"]) == 2


def test_fastflow_demo_smoke(tmp_path, capsys):
    # The whole demo (synthetic set, training, evaluation) with one epoch: it runs end to end offline.
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--epochs", "1", "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["category"] == "texture" and m["n_images"] == 30 and m["n_anomalous"] == 15
    assert (out / "run" / "model.pt").is_file() and np.isfinite(m["image_auroc"])
    assert "image_auroc" in capsys.readouterr().out


def test_pose_augmentation_calibrates_the_threshold_on_posed_held_out_copies_too(dataset, tmp_path):
    """--augment pose trains on randomly posed images and calibrates the threshold on the held-out images and
    POSE_COPIES posed copies of each (the poses it was trained to accept); --augment paper on the held-out
    images as they are."""
    from fastflow.train import POSE_COPIES

    for kind in ("pose", "paper"):
        out = tmp_path / kind
        assert main(["train", "--data", dataset, "--category", "texture", "--output", str(out), "--backbone",
                     "efficientnet_lite0", "--val-fraction", "0.3", "--augment", kind, *TINY]) == 0
        _, ckpt = load_run(str(out))
        assert ckpt["train_config"]["augment"] == kind and ckpt["train_config"]["cache_features"] is True
        n_held_out = len(split_validation(load_samples("mvtec", dataset, "texture", "train"), 0.3, 0)[1])
        posed = kind == "pose"
        assert ckpt["threshold"]["n_val"] == n_held_out * (1 + POSE_COPIES * posed)
        assert ("posed copies" in ckpt["threshold"]["calibrated_on"]) == posed
