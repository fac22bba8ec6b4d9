"""One configuration source: presets with overrides, the API's default, preprocessing derived from the config."""

import pytest

from fastflow.config import DEFAULT_PRESET, PRESETS, ModelConfig, TrainConfig, get_preset
from fastflow.data import Preprocess
from fastflow.train import _resolve_configs


@pytest.mark.parametrize("name", PRESETS)
def test_from_preset_without_overrides_is_the_preset(name):
    assert ModelConfig.from_preset(name) == PRESETS[name].model
    assert TrainConfig.from_preset(name) == PRESETS[name].train


def test_from_preset_applies_overrides_and_defaults_to_the_default_preset():
    m = ModelConfig.from_preset("resnet18", input_size=128, hidden_ratio=0.25)
    assert (m.backbone, m.input_size, m.hidden_ratio, m.kernels) == ("resnet18", (128, 128), 0.25, "3-3")
    assert ModelConfig.from_preset() == get_preset(DEFAULT_PRESET).model
    assert TrainConfig.from_preset() == get_preset(DEFAULT_PRESET).train
    with pytest.raises(ValueError, match="flow_steps must be >= 1"):  # the dataclass still validates
        ModelConfig.from_preset(flow_steps=0)


def test_from_preset_epochs_are_exact_unless_a_step_budget_is_given_as_in_the_cli():
    lite = get_preset("efficientnet_lite0").train
    assert lite.steps is not None  # the lite presets train to a step budget
    assert TrainConfig.from_preset(epochs=7) == TrainConfig.from_preset(epochs=7, steps=None)
    assert TrainConfig.from_preset(epochs=7).steps is None
    assert TrainConfig.from_preset(epochs=7, steps=100).steps == 100
    assert TrainConfig.from_preset(batch_size=2).steps == lite.steps


@pytest.mark.parametrize("cls", [ModelConfig, TrainConfig])
def test_from_preset_unknown_names_are_clear_errors(cls):
    first = "backbone" if cls is ModelConfig else "epochs"  # the known fields are listed
    with pytest.raises(ValueError, match=rf"unknown {cls.__name__} fields \['bogus'\]; choose from {first}, "):
        cls.from_preset("resnet18", bogus=1)
    with pytest.raises(ValueError, match="unknown preset or backbone 'nope'"):
        cls.from_preset("nope")


def test_train_without_a_config_trains_the_default_preset():
    preset = get_preset(DEFAULT_PRESET)
    assert DEFAULT_PRESET == "efficientnet_lite0"  # what `fastflow train --backbone efficientnet_lite0` trains
    assert _resolve_configs(None, None) == (preset.model, preset.train)
    r18 = get_preset("resnet18")
    assert _resolve_configs(r18, None) == (r18.model, r18.train)
    short = TrainConfig.from_preset("resnet18", epochs=1)
    assert _resolve_configs(r18, short) == (r18.model, short)
    with pytest.raises(TypeError, match="needs its train_cfg too"):
        _resolve_configs(r18.model, None)
    with pytest.raises(TypeError, match="pass samples and run_dir by name"):  # train(preset, samples, run_dir)
        _resolve_configs(r18, [])


def test_preprocess_is_derived_from_the_model_config():
    cfg = ModelConfig.from_preset("lite0_unaligned", input_size=(48, 64))
    pre = Preprocess.from_config(cfg, (0.5,) * 3, (0.25,) * 3)
    assert (pre.input_size, pre.autocontrast, pre.equalize) == ((48, 64), cfg.autocontrast, False)
    assert pre.agrees_with(cfg)
    eq = ModelConfig.from_preset(equalize=True)
    assert Preprocess.from_config(eq, (0.5,) * 3, (0.25,) * 3).equalize
    assert not pre.agrees_with(ModelConfig.from_preset("lite0_unaligned"))  # another size
    assert not pre.agrees_with(ModelConfig.from_preset(input_size=(48, 64)))  # no stretch


def test_cli_levels_reset_a_presets_level_roles_unless_roles_are_given():
    """--levels with a preset whose map and score come from different levels (or with the automatic choice,
    which applies the options to every candidate) gives every named level both roles; --map-levels and
    --score-levels set them."""
    from fastflow.cli import _build_parser, _configs

    parse = lambda *extra: _build_parser().parse_args(["train", "--output", "run", *extra])
    fine = get_preset("lite0_unaligned_fine").model
    assert (fine.levels, fine.map_levels, fine.score_levels) == ((2, 3, 4), (2, 3), (4,))
    assert _configs(parse(), "lite0_unaligned_fine")[0] == fine
    model, _ = _configs(parse("--levels", "1,2"), "lite0_unaligned_fine")
    assert (model.levels, model.map_levels, model.score_levels) == ((1, 2), None, None)
    model, _ = _configs(parse("--levels", "2,3,4", "--map-levels", "2", "--score-levels", "3,4"), "efficientnet_lite0")
    assert (model.levels, model.map_levels, model.score_levels) == ((2, 3, 4), (2,), (3, 4))
    with pytest.raises(ValueError, match="subset of levels"):
        _configs(parse("--score-levels", "4"), "efficientnet_lite0")  # its levels are 1, 2, 3
