"""Feature generation with the inverse flow (paper Section 4.5, Figure 4): exactness, locality, CLI."""

import os

import pytest
import torch
from PIL import Image

from fastflow.cli import main
from fastflow.config import ModelConfig, TrainConfig
from fastflow.data import Preprocess, load_image, load_samples
from fastflow.demo import make_demo_dataset
from fastflow.run import load_run
from fastflow.flow import kernel_sizes
from fastflow.invert import perturb_and_generate, receptive_radius, region_to_cells
from fastflow.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cat = make_demo_dataset(str(root), n_train=8, n_test_good=3, n_test_defect=3)
    run_dir = str(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    train(ModelConfig(input_size=(64, 64)), TrainConfig(epochs=1, batch_size=8),
          load_samples("mvtec", str(root), cat, "train"), run_dir, progress=False, log=lambda *a: None)
    model, ckpt = load_run(run_dir)
    image_path = load_samples("mvtec", str(root), cat, "test")[-1].path
    image = Preprocess.from_dict(ckpt["preprocess"])(load_image(image_path))
    return {"dir": run_dir, "model": model, "image": image, "image_path": image_path}


def test_strength_zero_regenerates_the_features(run):
    gen = perturb_and_generate(run["model"], run["image"], (0, 0, 16, 16), strength=0.0, level=0)
    assert torch.equal(gen.perturbed_z, gen.z)
    # float32 round-off of 8 coupling steps forward then back, on LayerNorm'd features of magnitude
    # up to ~5: observed max error ~1e-6; 2e-5 leaves headroom for other BLAS kernels, not for a bug.
    torch.testing.assert_close(gen.regenerated, gen.features, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(gen.perturbed_prob_map, gen.prob_map)


@pytest.mark.parametrize("level", [0, 1])
def test_noise_changes_only_the_region_and_its_receptive_field(run, level):
    model = run["model"]
    gen = perturb_and_generate(model, run["image"], (0, 0, 8, 8), strength=3.0, level=level, seed=1)
    h, w = gen.z.shape[-2:]
    r0, r1, c0, c1 = gen.cells
    assert (r0, c0) == (0, 0) and r1 == c1 == max(1, 8 * h // 64)
    # z changes exactly inside the region and nowhere else.
    outside = torch.ones(h, w, dtype=torch.bool)
    outside[r0:r1, c0:c1] = False
    assert torch.equal(gen.perturbed_z[:, outside], gen.z[:, outside])
    assert (gen.perturbed_z - gen.z)[:, r0:r1, c0:c1].abs().mean() > 1.0
    # The inverse spreads the change by one cell per 3x3 convolution: 2 per 3x3 step, 0 per 1x1 step.
    radius = receptive_radius(model, level)
    assert radius == sum(2 * (k // 2) for k in kernel_sizes(8, "3-1")) == 8
    diff = (gen.regenerated - gen.features).abs().amax(dim=0)
    assert diff[r0:r1, c0:c1].max() > 0.1
    far = diff[r1 + radius:, :].flatten().tolist() + diff[:, c1 + radius:].flatten().tolist()
    if level == 0:  # 16x16 grid: a far-away band exists (at level 1, 8x8, the field covers everything)
        assert far and max(far) < 1e-4


def test_region_maps_to_overlapping_cells():
    assert region_to_cells((0, 0, 64, 64), (64, 64), (16, 16)) == (0, 16, 0, 16)
    assert region_to_cells((5, 9, 6, 10), (64, 64), (16, 16)) == (2, 3, 1, 2)
    assert region_to_cells((3, 0, 5, 4), (64, 64), (4, 4)) == (0, 1, 0, 1)
    with pytest.raises(ValueError, match="region must satisfy"):
        region_to_cells((0, 0, 65, 10), (64, 64), (16, 16))


def test_cli_invert_writes_the_panel(run, tmp_path, capsys):
    out = tmp_path / "panel"
    rc = main(["invert", run["dir"], run["image_path"], "--region", "40,40,100,100", "--output", str(out),
               "--strength", "2", "--level", "1", "--channel", "3"])
    assert rc == 0
    (png,) = os.listdir(out)
    with Image.open(out / png) as im:
        assert im.format == "PNG" and im.width > 3 * im.height  # five panels side by side
    assert "panel ->" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--region", "0,0,500,10"], "--region must satisfy"),
    (["--region", "0,0,10,10", "--level", "7"], "--level must be in"),
])
def test_cli_invert_user_errors_are_one_line(run, tmp_path, capsys, args, message):
    rc = main(["invert", run["dir"], run["image_path"], "--output", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
