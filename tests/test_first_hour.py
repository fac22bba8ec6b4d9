"""Issue 19, "a user's first hour": each trap a newcomer fell into, tried through ``fastflow.cli.main``.

One tiny run (64x64 synthetic texture set, 1 epoch) is trained once per module (``tiny_run`` in
conftest.py) and serves the prediction, export and calibration tests; the training tests train their
own 1-epoch runs on a few images.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.checkpoint import load_safe, save_atomic
from fastflow.cli import main
from fastflow.demo import make_demo_dataset
from helpers import cli

TINY = ["--backbone", "efficientnet_lite0", "--input-size", "64", "--epochs", "1", "--batch-size", "4", "--flow-steps", "2", "--quiet"]




@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """The synthetic texture set in MVTec layout: <root>/texture/{train,test,ground_truth}."""
    root = tmp_path_factory.mktemp("demo")
    make_demo_dataset(str(root), n_train=8, n_test_good=2, n_test_defect=2)
    return root / "texture"


@pytest.fixture(scope="module")
def png_folder(demo, tmp_path_factory) -> Path:
    """The user's own folders of PNGs: ok/ (normal) and bad/ (defective), no masks."""
    root = tmp_path_factory.mktemp("pngs")
    (root / "ok").mkdir()
    (root / "bad").mkdir()
    for i, p in enumerate(sorted((demo / "train" / "good").iterdir())):
        Image.open(p).convert("RGB").save(root / "ok" / f"{i:03d}.png")
    for i, p in enumerate(sorted((demo / "test").rglob("*.png"))):
        if p.parent.name != "good":
            Image.open(p).convert("RGB").save(root / "bad" / f"{i:03d}.png")
    return root


# -- 1: the folder format and PNGs --------------------------------------------------------------------------
def test_folder_format_keeps_pngs_and_needs_no_data_or_category(png_folder, tmp_path, capsys, monkeypatch):
    from fastflow.data import load_samples

    train = load_samples("folder", str(png_folder), "mine", "train", normal_dirs=["ok"])
    assert len(train) == 6 and all(s.path.endswith(".png") for s in train)  # 8 normals, every 5th to test
    monkeypatch.chdir(png_folder)
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--format", "folder", "--normal-dir", "ok", "--abnormal-dir", "bad",
                       "--output", run, *TINY)
    assert rc == 0, err
    saved = json.loads((run / "run.json").read_text())["data"]
    assert saved["root"] == str(png_folder) and saved["category"] == png_folder.name
    # evaluate takes the data, the format and the folder options from run.json
    rc, out, err = cli(capsys, "evaluate", run, "--quiet")
    assert rc == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_images"] == 2 + 2 and metrics["n_anomalous"] == 2


def test_mask_suffix_with_a_tag_still_marks_masks(tmp_path):
    from fastflow.data import load_samples

    for name in ("a.png", "b.png", "c.png", "a_mask.png"):
        (tmp_path / "ok").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "ok" / name)
    train = load_samples("folder", str(tmp_path), "m", "train", normal_dirs=["ok"], mask_suffix="_mask.png",
                         test_fraction=0)
    assert sorted(Path(s.path).name for s in train) == ["a.png", "b.png", "c.png"]


# -- 2 and 5: predict -----------------------------------------------------------------------------------------
def _two_images(folder: Path, demo_category: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(Path(demo_category, "test", "good").iterdir())[:2]):
        shutil.copy(p, folder / f"part{i}.png")


def test_predict_does_not_score_its_own_outputs(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    images = tmp_path / "images"
    _two_images(images, category)
    for _ in range(3):  # the output folder inside the input folder, as a user may well do
        rc, out, err = cli(capsys, "predict", run, images, "--output", images / "out", "--quiet", "--overwrite")
        assert rc == 0, err
        assert out.startswith("2 image(s) scored"), out
    summary = json.loads((images / "out" / "summary.json").read_text())
    assert summary["counts"]["images"] == 2


def test_predict_fails_when_every_input_failed_and_says_why(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "b.jpg").write_bytes(b"")
    rc, out, err = cli(capsys, "predict", run, bad, "--output", tmp_path / "out", "--quiet")
    assert rc == 1
    assert "a.png is not an image" in err and "b.jpg is empty" in err and "none of the 2" in err
    # one good image among them: exit 0, the reasons still on the terminal
    _two_images(bad, category)
    rc, out, err = cli(capsys, "predict", run, bad, "--output", tmp_path / "out2", "--quiet")
    assert rc == 0 and out.startswith("2 image(s) scored") and "a.png is not an image" in err


# -- 3 and 4: an existing run folder, and --resume -----------------------------------------------------------
def test_training_into_an_existing_run_is_refused_unless_overwrite_clears_it(demo, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", demo.parent, "--category", "texture", "--output", run, *TINY]
    assert cli(capsys, *args)[0] == 0
    for stale in ("model.onnx", "model.json", "metrics.json", "report.html"):  # an export and an evaluation
        (run / stale).write_text("old")
    (run / "notes.txt").write_text("the user's own file")
    rc, out, err = cli(capsys, *args)
    assert rc == 2 and "already holds a run" in err and "--overwrite" in err and "--resume" in err
    assert (run / "model.onnx").read_text() == "old"  # untouched
    rc, out, err = cli(capsys, *args, "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "history.json", "model.pt", "notes.txt", "run.json"]


def test_failed_train_leaves_no_orphan_run_json(tmp_path, capsys):
    data = tmp_path / "data" / "cat" / "train" / "good"
    data.mkdir(parents=True)
    for i in range(3):
        (data / f"{i}.png").write_text("not an image")
    rc, out, err = cli(capsys, "train", "--data", tmp_path / "data", "--category", "cat", "--output", tmp_path / "run",
                       *TINY)
    assert rc == 2 and "not an image" in err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_other_options_and_extends_a_finished_run(demo, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", "--data", demo.parent, "--category", "texture", "--output", run, *TINY)[0] == 0
    first = torch.load(run / "model.pt", weights_only=True)
    for extra, name in ((["--lr", "0.1"], "--lr"), (["--output", tmp_path / "elsewhere"], "--output"),
                        (["--batch-size", "2"], "--batch-size")):
        rc, out, err = cli(capsys, "train", "--resume", run, *extra, "--quiet")
        assert rc == 2 and name in err and "options it was started with" in err, err
    rc, out, err = cli(capsys, "train", "--resume", run, "--quiet")  # finished: says so, changes nothing
    assert rc == 0 and "finished all its 1 epochs" in out and "--epochs" in out
    # a run folder written before TrainConfig lost num_workers and gained keep_last_within resumes all the same,
    def as_older_version(cfg: dict) -> None:
        cfg["num_workers"] = 0
        del cfg["keep_last_within"]

    saved = json.loads((run / "run.json").read_text())
    as_older_version(saved["train_config"])
    (run / "run.json").write_text(json.dumps(saved))
    state = load_safe(str(run / "checkpoint.pt"))
    as_older_version(state["train_config"])
    # ... and whose checkpoint kept one epoch for the whole model, not one per flow
    state["best_epoch"], state["best_val_nll"] = max(state.pop("best_epochs")), sum(state.pop("best_val_nlls"))
    save_atomic(state, str(run / "checkpoint.pt"))
    rc, out, err = cli(capsys, "train", "--resume", run, "--epochs", "2", "--output", run, "--quiet")
    assert rc == 0, err
    assert "resuming" in out and "at epoch 2/2" in out
    history = json.loads((run / "history.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert json.loads((run / "run.json").read_text())["train_config"]["epochs"] == 2
    assert torch.load(run / "model.pt", weights_only=True)["train_config"]["epochs"] == 2
    assert first["train_config"]["epochs"] == 1
    rc, out, err = cli(capsys, "train", "--resume", run, "--epochs", "1", "--quiet")
    assert rc == 2 and "already run 2 epochs" in err


# -- 8: export without the export extra -----------------------------------------------------------------------
def test_export_without_onnx_is_one_line_naming_the_extra(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError, as when not installed
    rc, out, err = cli(capsys, "export", tiny_run[0], "--output", tmp_path / "m.onnx")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "pip install 'fastflow[export]'" in err and "onnx" in err
    assert not (tmp_path / "m.onnx").exists()


# -- 9: checkpoints: a text file is not an attack; model.pt readable by other accounts --------------------------
def test_text_file_as_model_pt_is_not_a_checkpoint_and_not_an_attack(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.pt").write_text("hello, I am a text file\n")
    rc, out, err = cli(capsys, "export", run)
    assert rc == 2 and "not a fastflow checkpoint" in err and "run code" not in err, err


def test_model_pt_is_written_readable_by_others_subject_to_umask(tiny_run, tmp_path):
    from fastflow.checkpoint import save_atomic

    old = os.umask(0o022)
    try:
        save_atomic({"format": 1}, str(tmp_path / "a.pt"))
        os.umask(0o077)
        save_atomic({"format": 1}, str(tmp_path / "b.pt"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.pt").st_mode) == 0o600


# -- 10: help --------------------------------------------------------------------------------------------------
def _subparsers():
    import argparse

    from fastflow.cli import _build_parser

    parser = _build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_every_command_has_a_description_and_every_option_help(capsys):
    parser, commands = _subparsers()
    assert {"train", "evaluate", "predict", "export", "invert", "presets", "demo"} <= set(commands)
    for name, p in commands.items():
        assert p.description and len(p.description) > 40, name
        for action in p._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    rc, out, _ = cli(capsys, "--help")
    assert rc == 0 and "``" not in out and "fastflow train" in out
    rc, out, _ = cli(capsys, "evaluate", "--help")
    assert "(default: 32)" in out  # --batch-size
    rc, out, _ = cli(capsys, "invert", "--help")
    assert "(default: 1)" in out and "(default: 0)" in out  # --level, --seed


def test_invert_level_counts_from_one_like_train_levels(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    image = sorted(Path(category, "test", "good").iterdir())[0]
    rc, out, err = cli(capsys, "invert", run, image, "--region", "0,0,16,16", "--output", tmp_path, "--level", "0")
    assert rc == 2 and "--level must be in 1..3" in err and "1: the finest" in err
    rc, out, err = cli(capsys, "invert", run, image, "--region", "0,0,16,16", "--output", tmp_path, "--level", "3")
    assert rc == 0 and os.listdir(tmp_path) == [f"{image.stem}-invert-level3.png"]


# -- 7: the threshold on few images, and calibrate -------------------------------------------------------------
def test_threshold_on_few_images_warns_and_says_how_many_are_needed(demo, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "train", "--data", demo.parent, "--category", "texture", "--output", run, *TINY)
    assert rc == 0, err
    assert "warning: the threshold rests on 1 normal image(s)" in out and "needs at least 100" in out
    assert f"fastflow calibrate {run} --normal-dir" in out
    threshold = torch.load(run / "model.pt", weights_only=True)["threshold"]
    assert threshold["reachable"] is False and threshold["n_needed"] == 100 and threshold["n_val"] == 1
    assert threshold["value"] == threshold["val_max"]  # the largest held-out score, as the warning says


def test_threshold_below_the_images_a_rate_needs_is_a_normal_prediction_bound():
    from scipy.stats import norm

    from fastflow.calibrate import MIN_FIT, threshold_from_scores

    rng = np.random.default_rng(0)
    # 2000 draws of 10 normal scores each (a texture's held-out count): how often a new good image exceeds the
    # threshold. The largest of 10 is exceeded with probability 1 / 11 whatever the rate asked for; the bound
    # keeps the rate asked for.
    rates = {"max": [], "bound": []}
    for _ in range(2000):
        held_out = rng.normal(1.0, 0.2, 10)
        th = threshold_from_scores(held_out, 0.01, "test")
        assert th["method"] == "normal prediction bound" and not th["reachable"] and "normal fit" in th["warning"]
        rates["bound"].append(norm.sf(th["value"], 1.0, 0.2))
        rates["max"].append(norm.sf(held_out.max(), 1.0, 0.2))
    assert 0.08 < np.mean(rates["max"]) < 0.10
    assert 0.008 < np.mean(rates["bound"]) < 0.012
    # one outlier among many ordinary scores no longer sets the threshold by itself (Magnetic Tile's case)
    scores = np.concatenate([rng.normal(0.5, 0.2, 75), [5.5]])
    th = threshold_from_scores(scores, 0.01, "test")
    assert th["value"] < 5.5 and th["val_max"] == 5.5 and (scores > th["value"]).sum() == 1
    # enough images: the order statistic, as before; too few to fit: the largest score
    scores = rng.normal(0, 1, 200)
    th = threshold_from_scores(scores, 0.01, "test")
    assert th["method"] == "order statistic" and th["reachable"] and (scores > th["value"]).sum() == 2
    th = threshold_from_scores(scores[:MIN_FIT - 1], 0.01, "test")
    assert th["method"] == "largest score" and th["value"] == scores[:MIN_FIT - 1].max()


def test_calibrate_sets_the_threshold_again_from_more_good_images(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good = Path(category, "train", "good")
    before = torch.load(copy / "model.pt", weights_only=True)
    (copy / "model.json").write_text(json.dumps({"format": "fastflow-onnx", "threshold": {"value": 1.0}}))
    (copy / "model.onnx").write_bytes(b"stand-in")
    rc, out, err = cli(capsys, "calibrate", copy, "--normal-dir", good, "--false-alarm-rate", "0.25", "--quiet")
    assert rc == 0, err
    after = torch.load(copy / "model.pt", weights_only=True)
    t = after["threshold"]
    from fastflow.metrics import threshold_at_fpr
    from fastflow.predict import Predictor

    scores = [r.score for r in Predictor.from_run(run).predict(sorted(map(str, good.iterdir())))]
    assert t["n_val"] == 16 and t["reachable"] and t["value"] == pytest.approx(threshold_at_fpr(scores, 0.25),
                                                                                 rel=1e-6)
    assert sum(s > t["value"] for s in scores) == 4  # a quarter of the 16 good images above it
    assert t["previous"]["value"] == before["threshold"]["value"] and "model.json" in out
    assert json.loads((copy / "model.json").read_text())["threshold"]["value"] == t["value"]
    for key in ("state", "model_config", "preprocess"):  # nothing else changed
        assert str(after[key]) == str(before[key])
    assert Predictor.from_run(str(copy)).threshold == t["value"]
    # too few images for the rate: done, with the warning on stderr
    rc, out, err = cli(capsys, "calibrate", copy, "--normal-dir", good, "--false-alarm-rate", "0.01", "--quiet")
    assert rc == 0 and "needs at least 100" in err


# -- 6: presets at once, by arithmetic ---------------------------------------------------------------------------
def test_presets_prints_in_under_5_s_without_torch(tmp_path):
    code = ("import sys, time\nt = time.perf_counter()\nfrom fastflow.cli import main\nrc = main(['presets'])\n"
            "assert rc == 0 and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]\n"
            "print(f'SECONDS {time.perf_counter() - t:.3f}')\n")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.split("SECONDS ")[1]) < 5.0
    header, *rows = proc.stdout.splitlines()[:-1]
    assert "training" in header and "batch" in header and "parts" in header and "weights" in header
    from fastflow.config import PRESETS

    lite0, cait = PRESETS["efficientnet_lite0"].train, PRESETS["cait"].train
    row = next(r for r in rows if r.startswith("efficientnet_lite0"))
    length = f"{lite0.steps} steps" if lite0.steps else f"{lite0.epochs} epochs"
    assert length in row and row.split()[-3:] == [str(lite0.batch_size), "aligned", "offline"]
    assert next(r for r in rows if r.startswith("lite0_unaligned ")).split()[-2:] == ["unaligned", "offline"]
    assert next(r for r in rows if r.startswith("lite0_unaligned_fine ")).split()[-2:] == ["unaligned", "offline"]
    row = next(r for r in rows if r.startswith("cait"))
    assert f"{cait.epochs} epochs" in row and row.split()[-3:] == [str(cait.batch_size), "aligned", "download"]


def test_preset_arithmetic_equals_the_built_networks():
    from dataclasses import replace

    from fastflow import backbones, flow
    from fastflow.config import PRESETS, ModelConfig
    from fastflow.model import FastFlow
    from fastflow.presets import FACTS, feature_levels, kernel_sizes, parameter_counts

    assert set(FACTS) == set(backbones.BACKBONES)
    for name, spec in backbones.BACKBONES.items():
        facts = FACTS[name]
        assert (facts.kind, facts.levels, facts.offline) == (spec.kind, spec.indices, spec.lite_package is not None)
    for steps in (1, 8, 20):
        for kernels in ("3-1", "3-3"):
            assert kernel_sizes(steps, kernels) == flow.kernel_sizes(steps, kernels)
    built = {}
    for name, levels in (("resnet18", (1, 2, 3)), ("efficientnet_lite0", (1, 2, 3)), ("efficientnet_lite0", (4,)),
                         ("efficientnet_lite0", (2, 3, 4))):
        bb = backbones.build_backbone(name, "random", levels)
        facts = FACTS[name]
        assert bb.channels == [facts.channels[i] for i in levels] and bb.strides == [facts.strides[i] for i in levels]
        built[name, levels] = bb
    configs = [PRESETS["resnet18"].model, PRESETS["efficientnet_lite0"].model, PRESETS["lite0_unaligned"].model,
               PRESETS["lite0_unaligned_fine"].model,
               ModelConfig("resnet18", (100, 72), flow_steps=3, hidden_ratio=0.16, kernels="3-1"),
               ModelConfig("efficientnet_lite0", (90, 130), flow_steps=2, hidden_ratio=1.3, norm_affine=False)]
    for cfg in configs:
        levels = cfg.levels or backbones.BACKBONES[cfg.backbone].indices
        model = FastFlow(replace(cfg), backbone=built[cfg.backbone, tuple(levels)])
        assert parameter_counts(cfg) == model.parameter_counts(), cfg
        assert [tuple(lv["shape"]) for lv in feature_levels(cfg)] == model.feature_shapes, cfg


# -- 12: tiling large frames ---------------------------------------------------------------------------------------
def test_tiling_finds_a_small_defect_in_a_large_frame(tiny_run, tmp_path, capsys):
    """The 512 px gravel photograph with a 16 px dark spot; the run saw 128 px crops of it at 64 px."""
    from PIL import ImageDraw

    from fastflow.demo import _texture
    from fastflow.predict import Predictor

    run, _ = tiny_run
    frame = Image.fromarray(_texture()).convert("RGB")
    cy, cx = 300, 200
    ImageDraw.Draw(frame).ellipse([cx - 8, cy - 8, cx + 8, cy + 8], fill=(0, 0, 0))
    rgb = np.asarray(frame)
    whole = Predictor.from_run(run).predict(rgb)
    tiled = Predictor.from_run(run, tile=128).predict(rgb)
    assert tiled.anomaly_map.shape == (512, 512)

    def distance(amap):
        y, x = np.unravel_index(np.argmax(amap), amap.shape)
        return float(np.hypot(y - cy, x - cx))

    assert distance(tiled.anomaly_map) < 12  # found: the map peaks on the spot
    assert distance(whole.anomaly_map) > 50  # squashed to 64 px, the spot vanishes
    assert tiled.score == pytest.approx(float(tiled.anomaly_map.max()))
    # the CLI: the same score in the summary
    frame.save(tmp_path / "frame.png")
    rc, out, err = cli(capsys, "predict", run, tmp_path / "frame.png", "--tile", "128", "--output", tmp_path / "out",
                       "--quiet")
    assert rc == 0, err
    (row,) = json.loads((tmp_path / "out" / "summary.json").read_text())["results"]
    assert row["score"] == pytest.approx(tiled.score, rel=1e-5)


def test_tile_starts_cover_the_frame_with_overlap():
    from fastflow.predict import _tile_starts

    assert _tile_starts(100, 128, 0.25) == [0]
    starts = _tile_starts(512, 128, 0.25)
    assert starts[0] == 0 and starts[-1] == 512 - 128 and all(0 < b - a <= 96 for a, b in zip(starts, starts[1:]))


# -- 11: an ONNX graph that takes the image as decoded ------------------------------------------------------------
DEPLOY = """
import sys
sys.modules["fastflow"] = None  # the deployment must not need fastflow: importing it would fail here
import json
import numpy as np
import onnxruntime as ort
from PIL import Image

onnx_path, *images = sys.argv[1:]
meta = json.load(open(onnx_path[:-len(".onnx")] + ".json"))
session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
for path in images:
    rgb = np.asarray(Image.open(path).convert("RGB"))
    score, amap = session.run(["score", "anomaly_map"], {"image": rgb})
    print(json.dumps({"path": path, "score": float(score[0]), "anomalous": bool(score[0] > meta["threshold"]["value"]),
                      "map": list(amap.shape)}))
"""


def test_raw_input_onnx_scores_like_the_predictor_without_fastflow(tiny_run, tmp_path, capsys):
    from fastflow.predict import Predictor

    run, category = tiny_run
    rc, out, err = cli(capsys, "export", run, "--format", "onnx", "--raw-input", "--output", tmp_path / "raw.onnx")
    assert rc == 0, err
    meta = json.loads((tmp_path / "raw.json").read_text())
    assert meta["inputs"][0]["dtype"] == "uint8" and meta["inputs"][0]["shape"] == ["height", "width", 3]
    images = sorted(Path(category, "test").rglob("*.png"))[:3]
    rng = np.random.default_rng(0)
    for i, size in enumerate(((301, 217), (97, 450), (1000, 37))):  # odd sizes, both pass orders of Pillow
        base = Image.open(images[i % len(images)]).convert("RGB")
        base.resize((size[1], size[0]), Image.Resampling.BICUBIC).save(tmp_path / f"odd{i}.png")
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(tmp_path / "grey.png")  # an L image
    paths = [*map(str, images), *(str(tmp_path / f"odd{i}.png") for i in range(3)), str(tmp_path / "grey.png")]
    script = tmp_path / "deploy.py"
    script.write_text(DEPLOY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "raw.onnx"), *paths], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    deployed = [json.loads(line) for line in proc.stdout.splitlines()]
    predictor = Predictor.from_run(run)
    for row, reference in zip(deployed, predictor.predict(paths)):
        # Pillow resizes in fixed point, the graph in float32: a pixel may differ by one grey level
        assert row["score"] == pytest.approx(reference.score, rel=2e-3, abs=2e-3), row["path"]
        assert row["map"] == [1, 1, 64, 64]
    assert len(deployed) == len(paths)


# -- also expected by users ----------------------------------------------------------------------------------------
def test_info_shows_configuration_threshold_metrics_and_files(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    rc, out, err = cli(capsys, "info", copy)
    assert rc == 0, err
    for words in ("efficientnet_lite0", "input 64x64", "threshold  ", "false-alarm rate 0.01", "held-out training",
                  "needs at least 100", "model.pt (", "metrics    none yet", "fastflow 0.1.0"):
        assert words in out, words
    (copy / "metrics.json").write_text(json.dumps({"image_auroc": 0.9, "pixel_auroc": 0.8, "n_images": 4}))
    rc, out, err = cli(capsys, "info", copy, "--json")
    info = json.loads(out)
    assert info["metrics"]["image_auroc"] == 0.9 and info["threshold"]["n_val"] == 5
    assert info["model_config"]["input_size"] == [64, 64] and "model.pt" in info["files"]
    rc, out, err = cli(capsys, "info", tmp_path / "nothing")
    assert rc == 2 and "checkpoint not found" in err


def test_prediction_repr_heatmap_overlay_and_to_dict(tiny_run):
    import fastflow

    run, category = tiny_run
    path = str(sorted(Path(category, "test", "good").iterdir())[0])
    pred = fastflow.Predictor.from_run(run).predict(path)
    assert isinstance(pred, fastflow.Prediction)
    text = repr(pred)
    assert "\n" not in text and len(text) < 300 and "score=" in text and ("normal" in text or "ANOMALOUS" in text)
    h, w = pred.anomaly_map.shape
    assert pred.heatmap().shape == (h, w, 3) and pred.heatmap().dtype == np.uint8
    assert pred.overlay().shape == (h, w, 3)
    d = pred.to_dict()
    assert json.loads(json.dumps(d)) == d and d["score"] == pred.score and d["width"] == w
    assert fastflow.DatasetError.__name__ == "DatasetError"
    with pytest.raises(fastflow.DatasetError):
        fastflow.Predictor.from_run(run).predict(str(Path(category).parent / "missing.png"))


def test_summary_gives_paths_as_given_not_through_symlinks(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    real = tmp_path / "real"
    _two_images(real, category)
    (tmp_path / "link").symlink_to(real)
    rc, out, err = cli(capsys, "predict", run, tmp_path / "link", "--output", tmp_path / "out", "--quiet")
    assert rc == 0, err
    rows = json.loads((tmp_path / "out" / "summary.json").read_text())["results"]
    assert sorted(r["path"] for r in rows) == [str(tmp_path / "link" / f"part{i}.png") for i in range(2)]


def test_demo_without_scikit_image_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    rc, out, err = cli(capsys, "demo", "--output", tmp_path / "demo", "--quiet")
    assert rc == 2 and "pip install 'fastflow[demo]'" in err and err.count("\n") == 1
