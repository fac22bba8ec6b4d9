"""Bad input, faults and safety: every user mistake ends in a result or one clear error, never a traceback.

Each bad input is built in a temporary folder and tried through the CLI (``fastflow.cli.main``, exit
code and the key words of the stderr line) and through the Python API (the exception and its text).
One tiny run (64x64 synthetic texture set, 2 flow steps, augmentation on) is trained once per module
and serves every test; the kill-and-resume test trains the same run again in a subprocess, kills it
with SIGKILL while it writes its third checkpoint, resumes it, and compares the result tensor by tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow import backbones
from fastflow.checkpoint import CheckpointError, load_safe
from fastflow.cli import main
from fastflow.config import ModelConfig, TrainConfig
from fastflow.data import AnomalyDataset, DatasetError, Preprocess, check_readable, load_image, load_samples
from fastflow.demo import make_demo_dataset
from fastflow.model import FastFlow
from fastflow.predict import Predictor, output_names, predict_to_folder
from fastflow.train import TrainingError, train
from helpers import cli

EPOCHS = 4  # the subprocess is killed while saving epoch 3 of 4: mid-run, with an epoch left to resume
TRAIN_ARGS = ["--category", "texture", "--input-size", "64", "--epochs", str(EPOCHS), "--batch-size", "4",
              "--flow-steps", "2", "--augment", "--quiet", "--threads", "2"]  # a fixed count: bit-for-bit resumes




def assert_one_line_error(rc: int, err: str, *words: str) -> None:
    """Exit code 2, exactly one stderr line, no traceback, every key word present."""
    assert rc == 2, err
    assert "Traceback" not in err and err.strip() and err.strip().count("\n") == 0, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def assert_listing_error(rc: int, err: str, first_line_words: list[str], listed: list[str]) -> None:
    """Exit code 2, no traceback; the first line says what is wrong, the following lines list the files."""
    assert rc == 2 and "Traceback" not in err, err
    first = err.strip().splitlines()[0]
    for w in first_line_words:
        assert w in first, f"{w!r} not in {first!r}"
    for name in listed:
        assert name in err, f"{name!r} not listed in {err!r}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The synthetic set and an uninterrupted reference run (CLI, in-process)."""
    root = tmp_path_factory.mktemp("robust")
    data = root / "data"
    make_demo_dataset(str(data), n_train=8, n_test_good=3, n_test_defect=3)
    run = root / "reference"
    assert main(["train", "--data", str(data), *TRAIN_ARGS, "--output", str(run)]) == 0
    return {"root": root, "data": data, "run": run}


@pytest.fixture(scope="module")
def predictor(base) -> Predictor:
    return Predictor.from_run(str(base["run"]))


def copy_data(base, tmp_path: Path) -> Path:
    """A private copy of the synthetic set (root folder), to break."""
    dst = tmp_path / "data"
    shutil.copytree(base["data"], dst)
    return dst


# -- image files ------------------------------------------------------------------------------------
def _rgb(h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _exif_rotated(path: Path) -> None:
    """64 wide x 48 high, left half black, EXIF orientation 6: shown upright it is 48 x 64, black on top."""
    pixels = np.full((48, 64, 3), 255, np.uint8)
    pixels[:, :32] = 0
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def _png_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="JPEG")
    return buf.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_png_bytes())
    data[80:400] = bytes(320)  # valid header, zeroed compressed data
    return bytes(data)


# name -> (writer, (H, W) of the result upright)
GOOD_IMAGES = {
    "gray.png": (lambda p: Image.fromarray(_rgb()).convert("L").save(p), (48, 64)),
    "rgba.png": (lambda p: Image.fromarray(np.dstack([_rgb(), np.full((48, 64), 128, np.uint8)])).save(p),
                 (48, 64)),
    "palette.png": (lambda p: Image.fromarray(_rgb()).convert("P").save(p), (48, 64)),
    "palette_transparent.png": (lambda p: Image.fromarray(_rgb()).convert("P").save(p, transparency=0), (48, 64)),
    "sixteen_bit.png": (lambda p: Image.fromarray((np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)).save(p),
                        (48, 64)),
    "cmyk.jpg": (lambda p: Image.fromarray(_rgb()).convert("CMYK").save(p), (48, 64)),
    "cmyk.tif": (lambda p: Image.fromarray(_rgb()).convert("CMYK").save(p), (48, 64)),
    "exif_rotated.jpg": (_exif_rotated, (64, 48)),
    "tiny_8x8.png": (lambda p: Image.fromarray(_rgb(8, 8)).save(p), (8, 8)),
    "one_pixel.png": (lambda p: Image.fromarray(_rgb(1, 1)).save(p), (1, 1)),
}
# name -> (bytes, key words of the error)
BAD_IMAGES = {
    "truncated.png": (lambda: _png_bytes()[:len(_png_bytes()) // 2], "truncated or corrupt"),
    "truncated.jpg": (lambda: _jpeg_bytes()[:len(_jpeg_bytes()) // 2], "truncated or corrupt"),
    "corrupt.png": (_corrupt_png, "truncated or corrupt"),
    "not_an_image.png": (lambda: b"name,score\nthis is a CSV file, not a picture\n", "not an image"),
    "really_a_pdf.jpg": (lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not an image"),
    "zero_bytes.png": (lambda: b"", "empty (0 bytes)"),
}
HIDDEN = {".DS_Store": b"\x00\x00\x00\x01Bud1", "Thumbs.db": b"\xd0\xcf\x11\xe0junk", "._gray.png": b"\x00\x05\x16\x07",
          "desktop.ini": b"[.ShellClassInfo]", "notes.txt": b"not an image, no image extension"}


def write_images(folder: Path, good: bool = True, bad: bool = True, hidden: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if good:
        for name, (write, _) in GOOD_IMAGES.items():
            write(folder / name)
    if bad:
        for name, (content, _) in BAD_IMAGES.items():
            (folder / name).write_bytes(content())
    if hidden:
        for name, content in HIDDEN.items():
            (folder / name).write_bytes(content)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images") / "in"
    write_images(folder)
    return folder


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_api_reads_every_image_mode_upright(image_folder, predictor, name):
    image = load_image(image_folder / name)
    h, w = GOOD_IMAGES[name][1]
    assert image.mode == "RGB" and image.size == (w, h)
    result = predictor.predict(str(image_folder / name))
    assert result.anomaly_map.shape == (h, w) and np.isfinite(result.score)
    if name == "exif_rotated.jpg":  # turned upright: the black left half is now the top half
        pixels = np.asarray(image).mean(axis=2)
        assert pixels[:24].mean() < 30 and pixels[40:].mean() > 225
    if name == "sixteen_bit.png":  # scaled from 16 to 8 bits, not clipped
        raw = np.arange(48 * 64).reshape(48, 64) * 21
        assert np.abs(np.asarray(image)[..., 0].astype(float) - raw / 257).max() <= 1


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_api_bad_image_raises_dataset_error_naming_it(image_folder, predictor, name):
    words = BAD_IMAGES[name][1]
    for call in (lambda: load_image(image_folder / name), lambda: predictor.predict(str(image_folder / name))):
        with pytest.raises(DatasetError) as err:
            call()
        assert name in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_cli_predict_folder_reports_bad_files_and_scores_the_rest(base, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "predict", base["run"], image_folder, "--output", out, "--quiet",
                          "--batch-size", "4")
    assert rc == 0 and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    results = {Path(r["path"]).name: r for r in summary["results"]}
    assert set(results) == set(GOOD_IMAGES) | set(BAD_IMAGES)  # hidden files and non-images are not inputs
    assert summary["counts"]["ok"] == len(GOOD_IMAGES) and summary["counts"]["error"] == len(BAD_IMAGES)
    assert f"{len(BAD_IMAGES)} unreadable" in stdout
    for name, (_, words) in BAD_IMAGES.items():
        assert results[name]["status"] == "error" and name in results[name]["error"] and words in results[name]["error"]
    for name, (_, (h, w)) in GOOD_IMAGES.items():
        r = results[name]
        assert r["status"] == "ok"
        assert Image.open(out / r["mask"]).size == (w, h) and Image.open(out / r["heatmap"]).size == (w, h)


def test_decompression_bomb_limit_is_a_clear_error(image_folder, monkeypatch):
    # Pillow refuses images above 2 * MAX_IMAGE_PIXELS (default 89.5M, so 179M pixels); lowered here to
    # test the message on a small file. Between 1x and 2x it only warns and the image is read.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DatasetError, match="too large to open safely") as err:
        load_image(image_folder / "gray.png")  # 3072 pixels > 2 * 1000
    assert "gray.png" in str(err.value) and "MAX_IMAGE_PIXELS" in str(err.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(image_folder / "gray.png").size == (64, 48)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``...), in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def peak_rss_increase_mb(function) -> tuple[object, float]:
    """(function(), peak resident memory above the starting level in MiB). The peak is the kernel's own
    high-water mark (VmHWM), reset to the current size first (Linux >= 4.0: "5" into /proc/self/clear_refs),
    so no short-lived peak is missed, as one between two samples of a polling thread could be."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status_mb("VmRSS")
    result = function()
    return result, _status_mb("VmHWM") - start


# peak_rss_increase_mb resets the kernel's high-water mark: Linux with a writable /proc/self/clear_refs.
needs_clear_refs = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                      reason="needs Linux /proc (clear_refs) to measure peak memory")


@needs_clear_refs
def test_peak_rss_sees_a_short_lived_allocation():
    # 400 MiB touched and freed at once: gone before any sampler could see it, but in the high-water mark.
    _, increase = peak_rss_increase_mb(lambda: np.ones(50 * 2**20).sum())
    assert 350 < increase < 1000, increase


@pytest.mark.slow
@needs_clear_refs
def test_8000x8000_image_is_scored_in_reasonable_memory(predictor, tmp_path):
    # 64M pixels is below Pillow's decompression-bomb warning (89.5M): no warning, no error. The RGB
    # image alone is 183 MiB and its full-size float32 anomaly map 244 MiB; allow a few such copies.
    path = tmp_path / "large.jpg"
    Image.new("RGB", (8000, 8000), (120, 90, 60)).save(path, quality=50)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        result, increase = peak_rss_increase_mb(lambda: predictor.predict(str(path)))
    assert result.anomaly_map.shape == (8000, 8000) and np.isfinite(result.score)
    assert increase < 1500, f"peak memory grew by {increase:.0f} MiB for one 8000x8000 image"


# -- datasets ---------------------------------------------------------------------------------------
def test_hidden_files_in_dataset_folders_are_ignored(base, tmp_path):
    data = copy_data(base, tmp_path)
    for folder in [data / "texture" / "train" / "good", data / "texture" / "test" / "scratch",
                   data / "texture" / "ground_truth" / "scratch", data / "texture"]:
        for name, content in HIDDEN.items():
            (folder / name).write_bytes(content)
    (data / ".DS_Store").write_bytes(HIDDEN[".DS_Store"])
    train_samples = load_samples("mvtec", str(data), "texture", "train")
    test_samples = load_samples("mvtec", str(data), "texture", "test")  # mask pairing ignores them too
    names = {Path(s.path).name for s in train_samples + test_samples}
    assert not names & set(HIDDEN) and len(train_samples) == 8 and len(test_samples) == 6
    check_readable(train_samples + test_samples)


def test_unreadable_training_files_stop_training_before_it_starts(base, tmp_path, capsys):
    data = copy_data(base, tmp_path)
    good = data / "texture" / "train" / "good"
    (good / "zero_bytes.png").write_bytes(b"")
    (good / "truncated.png").write_bytes(_png_bytes()[:300])
    (good / "not_an_image.jpg").write_bytes(b"hello")
    (good / ".DS_Store").write_bytes(HIDDEN[".DS_Store"])  # ignored, not reported
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", "--data", data, *TRAIN_ARGS, "--output", run)
    assert_listing_error(rc, err, ["3 of 11 files cannot be read"],
                         ["zero_bytes.png", "truncated.png", "not_an_image.jpg", "Fix or delete them"])
    assert ".DS_Store" not in err
    assert not (run / "checkpoint.pt").exists() and not (run / "model.pt").exists()
    with pytest.raises(DatasetError, match="3 of 11 files cannot be read"):
        train(ModelConfig(input_size=(64, 64)), TrainConfig(epochs=1),
              load_samples("mvtec", str(data), "texture", "train"), str(tmp_path / "api-run"), progress=False)


def test_dataset_mistakes_are_one_line_errors(base, tmp_path, capsys):
    data = copy_data(base, tmp_path)
    (data / "empty").mkdir()  # an empty category folder
    (data / "hollow" / "train" / "good").mkdir(parents=True)  # no normal images, only clutter
    (data / "hollow" / "train" / "good" / ".DS_Store").write_bytes(HIDDEN[".DS_Store"])
    (data / "hollow" / "train" / "good" / "readme.txt").write_text("put images here")
    run = tmp_path / "run"
    cases = [
        (["--category", "empty"], ["MVTec training folder", "does not exist", "empty"]),
        (["--category", "hollow"], ["no normal training images", "hollow", "add defect-free images"]),
        (["--category", "textrue"], ["'textrue' not found", "available: hollow, texture"]),
        (["--category", "../texture,texture"], ["not paths", "../texture"]),
    ]
    for extra, words in cases:
        rc, _, err = cli(capsys, "train", "--data", data, "--output", run, "--quiet", *extra)
        assert_one_line_error(rc, err, *words)
    rc, _, err = cli(capsys, "train", "--data", tmp_path / "nowhere", "--category", "texture", "--output", run)
    assert_one_line_error(rc, err, "nowhere", "does not exist", "check the dataset root")
    rc, _, err = cli(capsys, "evaluate", base["run"], "--data", data, "--category", "hollow")
    assert_one_line_error(rc, err, "MVTec test folder", "hollow", "does not exist")
    for split in ("train", "test"):
        with pytest.raises(DatasetError, match="not found in"):
            load_samples("mvtec", str(data), "textrue", split)


# -- masks ------------------------------------------------------------------------------------------
def test_masks_of_another_size_and_not_binary_are_used(base, tmp_path, capsys):
    data = copy_data(base, tmp_path)
    gt = data / "texture" / "ground_truth" / "scratch"
    mask_path = sorted(gt.iterdir())[0]
    original = np.asarray(Image.open(mask_path).convert("L")) > 0
    # Twice the image's size, anti-aliased: values 0..255 instead of 0/255.
    big = Image.fromarray(original.astype(np.uint8) * 200 + 3 * original.astype(np.uint8)).resize(
        (original.shape[1] * 2, original.shape[0] * 2), Image.Resampling.BILINEAR)
    assert len(np.unique(np.asarray(big))) > 2
    big.save(mask_path)
    samples = [s for s in load_samples("mvtec", str(data), "texture", "test") if s.mask_path == str(mask_path)]
    pre = Preprocess((64, 64), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    mask = AnomalyDataset(samples, pre)[0]["mask"]
    assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
    expected = np.asarray(Image.fromarray(original).resize((64, 64), Image.Resampling.NEAREST))
    assert np.mean(mask[0].numpy().astype(bool) != expected) < 0.02  # same defect, within resampling edges
    rc, _, err = cli(capsys, "evaluate", base["run"], "--data", data, "--category", "texture",
                     "--output", tmp_path / "metrics.json", "--quiet")
    assert rc == 0, err
    assert json.loads((tmp_path / "metrics.json").read_text())["pixel_auroc"] is not None


def test_mask_pairing_errors_name_the_files(base, tmp_path, capsys):
    data = copy_data(base, tmp_path)
    gt = data / "texture" / "ground_truth" / "scratch"
    lost = sorted(gt.iterdir())[0]
    lost.unlink()  # an image without its mask
    Image.new("L", (160, 160)).save(gt / "777_mask.png")  # a mask without its image
    rc, _, err = cli(capsys, "evaluate", base["run"], "--data", data, "--category", "texture", "--quiet")
    image_name = lost.name.replace("_mask", "")
    assert_listing_error(rc, err, ["mask pairing failed"],
                         ["have no mask", image_name, "Add the missing masks", "no matching defect image",
                          "777_mask.png", "delete these masks"])
    with pytest.raises(DatasetError, match="mask pairing failed"):
        load_samples("mvtec", str(data), "texture", "test")


def test_unreadable_test_image_or_mask_is_a_one_line_error(base, tmp_path, capsys):
    data = copy_data(base, tmp_path)
    mask = sorted((data / "texture" / "ground_truth" / "spot").iterdir())[0]
    mask.write_bytes(b"")
    rc, _, err = cli(capsys, "evaluate", base["run"], "--data", data, "--category", "texture", "--quiet")
    assert_one_line_error(rc, err, mask.name, "empty (0 bytes)", "replace it or delete it")


# -- options ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--epochs", "-1"], ["epochs must be >= 1", "-1"]),
    (["--epochs", "0"], ["epochs must be >= 1"]),
    (["--batch-size", "0"], ["batch size must be >= 1", "0"]),
    (["--backbone", "resnet9000"], ["unknown preset or backbone 'resnet9000'", "choose from", "efficientnet_lite0"]),
    (["--input-size", "8"], ["--input-size", ">= 16", "'8'", "--help"]),
    (["--input-size", "big"], ["--input-size", "'big'", "--help"]),
    (["--lr", "-1"], ["learning rate must be > 0"]),
    (["--val-fraction", "1.5"], ["val_fraction must be in [0, 1)"]),
    (["--kernels", "5-5"], ["--kernels", "invalid choice", "--help"]),
])
def test_nonsense_train_options_are_one_line_errors(base, tmp_path, capsys, args, words):
    rc, _, err = cli(capsys, "train", "--data", base["data"], "--category", "texture", "--output",
                     tmp_path / "run", *args)
    assert_one_line_error(rc, err, *words)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_other_nonsense_options(base, tmp_path, capsys):
    rc, _, err = cli(capsys, "evaluate", base["run"], "--data", base["data"], "--category", "texture",
                     "--batch-size", "0")
    assert_one_line_error(rc, err, "--batch-size", "must be > 0")
    rc, _, err = cli(capsys, "train", "--data", base["data"], "--category", "texture")
    assert_one_line_error(rc, err, "--output")
    rc, _, err = cli(capsys, "predict", base["run"], tmp_path / "nothing-here", "--output", tmp_path / "o")
    assert_one_line_error(rc, err, "nothing-here", "not a file, a folder or a glob")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        TrainConfig(epochs=-3)
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        FastFlow(ModelConfig(backbone="nope"), weights="random")


def test_input_size_the_backbone_cannot_take(monkeypatch):
    # A ViT has a fixed token grid; a tiny one is registered here so the test builds in a second.
    spec = backbones.BackboneSpec("vit_tiny", "vit_tiny_patch16_224", "vit", (2,))
    monkeypatch.setitem(backbones.BACKBONES, "vit_tiny", spec)
    with pytest.raises(ValueError, match=r"cannot take input size \(64, 64\).*use --input-size 224,224"):
        FastFlow(ModelConfig(backbone="vit_tiny", input_size=(64, 64)), weights="random")
    assert FastFlow(ModelConfig(backbone="vit_tiny", input_size=(224, 224)), weights="random").feature_shapes == [
        (192, 14, 14)]


def test_a_probe_failure_that_is_not_about_the_size_is_not_blamed_on_it(monkeypatch):
    # Out of memory, a device error, a broken backbone: the error as it is, no "--input-size" advice.
    fe = backbones.build_backbone("resnet18", "random", (1, 2, 3))

    def broken(images):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(fe, "forward", broken)
    with pytest.raises(RuntimeError, match="device-side assert") as info:
        fe.feature_shapes((64, 64))
    assert "input-size" not in str(info.value)
    monkeypatch.setattr(fe, "forward", lambda images: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        fe.feature_shapes((64, 64))


# -- checkpoints ------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this calls os.system: creates the marker file if the loader executes code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _crafted_files(folder: Path, marker: Path) -> dict[str, Path]:
    """A raw pickle and a torch.save zip, both named model.pt, both executing code when unpickled."""
    raw = folder / "raw" / "model.pt"
    raw.parent.mkdir(parents=True)
    raw.write_bytes(pickle.dumps({"format": 1, "state": _RunsCode(marker)}, protocol=2))
    zipped = folder / "zipped" / "model.pt"
    zipped.parent.mkdir(parents=True)
    torch.save({"format": 1, "state": _RunsCode(marker)}, zipped)
    return {"raw": raw, "zipped": zipped}


def test_crafted_checkpoint_does_not_execute_code(base, image_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    files = _crafted_files(tmp_path, marker)
    # The files really are malicious: an unrestricted load runs the command (then the marker is removed).
    for load in (lambda: pickle.loads(files["raw"].read_bytes()),
                 lambda: torch.load(files["zipped"], weights_only=False)):
        load()
        assert marker.exists()
        marker.unlink()
    for kind, path in files.items():
        run = path.parent
        for args in (["evaluate", run, "--data", base["data"], "--category", "texture"],
                     ["predict", run, image_folder / "gray.png", "--output", tmp_path / f"out-{kind}"]):
            rc, _, err = cli(capsys, *args)
            assert_one_line_error(rc, err, str(path), "refused to load", "Only load checkpoints written by fastflow")
            assert not marker.exists()
        with pytest.raises(CheckpointError, match="refused to load"):
            Predictor.from_run(str(run))
        assert not marker.exists()
    assert not (tmp_path / "out-raw" / "summary.json").exists()


def _altered_run(base, tmp_path: Path, change) -> Path:
    run = tmp_path / "altered"
    run.mkdir()
    ckpt = torch.load(base["run"] / "model.pt", weights_only=True)
    change(ckpt)
    torch.save(ckpt, run / "model.pt")
    return run


def _truncated(base, tmp_path: Path) -> Path:
    run = tmp_path / "truncated"
    run.mkdir()
    data = (base["run"] / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[:len(data) // 2])
    return run


CHECKPOINT_CASES = {
    "other_format": (lambda c: c.update(format=99, version="9.0"), ["format 99", "fastflow 9.0", "retrain"]),
    "unknown_config_field": (lambda c: c["model_config"].update(attention_heads=4),
                             ["model config does not match this version", "attention_heads"]),
    "config_not_matching_weights": (lambda c: c["model_config"].update(flow_steps=3),
                                    ["weights do not match its config"]),
    "weights_of_wrong_shape": (lambda c: c["state"].update({k: v[:1] for k, v in list(c["state"].items())[:1]}),
                               ["weights do not match its config"]),
    "no_preprocess": (lambda c: c.pop("preprocess"), ["incomplete checkpoint", "preprocess"]),
    "preprocess_not_its_config": (lambda c: c["preprocess"].update(input_size=[32, 48]),
                                  ["preprocessing (input_size [32, 48]", "differs from its model config"]),
    "not_a_checkpoint": (lambda c: [c.pop(k) for k in list(c)], ["not a fastflow checkpoint"]),
}


@pytest.mark.parametrize("case", [*CHECKPOINT_CASES, "truncated", "missing"])
def test_unusable_checkpoints_are_one_line_errors(base, image_folder, tmp_path, capsys, case):
    if case == "truncated":
        run, words = _truncated(base, tmp_path), ["truncated or corrupt checkpoint", "retrain"]
    elif case == "missing":
        run, words = tmp_path / "empty-run", ["checkpoint not found", "model.pt"]
        run.mkdir()
    else:
        change, words = CHECKPOINT_CASES[case]
        run = _altered_run(base, tmp_path, change)
    for args in (["evaluate", run, "--data", base["data"], "--category", "texture", "--quiet"],
                 ["predict", run, image_folder / "gray.png", "--output", tmp_path / "out", "--quiet"]):
        rc, _, err = cli(capsys, *args)
        assert_one_line_error(rc, err, *words)
    with pytest.raises(CheckpointError):
        Predictor.from_run(str(run))


# -- faults -----------------------------------------------------------------------------------------
# Run in the killed subprocess: `fastflow train ARGS` whose third checkpoint save (epoch 3 of 4) stops half
# written and says so on stdout, then waits to be killed: the kill lands at the same place every time, inside
# a save, with no timing involved.
_HANGS_IN_THIRD_SAVE = """
import io, sys, threading
import torch
import fastflow.train as train_module
from fastflow.checkpoint import atomic_write
from fastflow.cli import main

real, calls = train_module.save_atomic, []

def save_atomic(obj, path):
    calls.append(path)
    if len(calls) < 3:
        return real(obj, path)
    data = io.BytesIO()
    torch.save(obj, data)

    def write(f):
        f.write(data.getvalue()[:len(data.getvalue()) // 2])
        f.flush()
        print("HALF-WRITTEN", flush=True)
        threading.Event().wait()

    atomic_write(path, write, binary=True)

train_module.save_atomic = save_atomic
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_gives_the_uninterrupted_model(base, tmp_path, capsys):
    run = tmp_path / "killed"
    cmd = [sys.executable, "-c", _HANGS_IN_THIRD_SAVE, "train", "--data", str(base["data"]), *TRAIN_ARGS,
           "--output", str(run)]
    with open(tmp_path / "stderr.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        lines = []
        for line in proc.stdout:  # blocks until the child is inside its third save (or ends)
            lines.append(line)
            if line.strip() == "HALF-WRITTEN":
                break
        assert proc.poll() is None, f"the run ended before it could be killed: {lines} {(tmp_path / 'stderr.txt').read_text()}"
        assert [p for p in os.listdir(run) if p.startswith(".tmp-")]  # killed while saving
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.pt").exists()
    killed_at = load_safe(str(run / "checkpoint.pt"))["epoch"]  # the last good checkpoint is intact
    assert killed_at == 1  # (counted from 0) the second epoch's, the one before the half-written save

    rc, out, err = cli(capsys, "train", "--resume", run, "--quiet", "--threads", "2")
    assert rc == 0, err
    assert f"resuming {run} at epoch {killed_at + 2}/{EPOCHS}" in out
    resumed, reference = (load_safe(str(r / "model.pt")) for r in (run, base["run"]))
    assert resumed["state"].keys() == reference["state"].keys()
    for key, tensor in reference["state"].items():
        assert torch.equal(resumed["state"][key], tensor), key  # bit for bit: same batches, same RNG draws
    assert resumed["threshold"] == reference["threshold"] and resumed["best_epoch"] == reference["best_epoch"]
    assert not [p for p in os.listdir(run) if p.startswith(".tmp-")]
    assert sorted(os.listdir(tmp_path)) == ["killed", "stderr.txt"]  # nothing written beside the run folder

    # Resuming with other options, or from a broken checkpoint, is refused in one line.
    saved = json.loads((run / "run.json").read_text())
    saved["train_config"]["lr"] = 0.5  # (a larger epoch count is allowed: it extends a run)
    (run / "run.json").write_text(json.dumps(saved))
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert_one_line_error(rc, err, "checkpoint.pt", "config differs", "start a new run folder")
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[:len(data) // 3])
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert_one_line_error(rc, err, "checkpoint.pt", "truncated or corrupt")
    (run / "run.json").write_text("{not json")
    rc, _, err = cli(capsys, "train", "--resume", run, "--quiet")
    assert_one_line_error(rc, err, "run.json", "corrupt", "start a new run")
    rc, _, err = cli(capsys, "train", "--resume", tmp_path / "never-trained")
    assert_one_line_error(rc, err, "run.json not found", "fastflow train --output")


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(base, tmp_path, monkeypatch, capsys):
    samples = load_samples("mvtec", str(base["data"]), "texture", "train")
    model_cfg, train_cfg = ModelConfig(input_size=(64, 64), flow_steps=1), TrainConfig(epochs=3, batch_size=4,
                                                                                         val_fraction=0)
    forward, calls = FastFlow.forward_features, {"train": 0}

    def poisoned(self, features, output_size=None, with_map=True):
        out = forward(self, features, output_size, with_map)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 4:  # epoch 2, step 2 (two steps per epoch)
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(FastFlow, "forward_features", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train(model_cfg, train_cfg, samples, str(run), progress=False, log=lambda *a: None)
    message = str(err.value)
    assert "non-finite loss at epoch 2, step 2" in message and str(run / "checkpoint.pt") in message
    assert "--lr" in message and "\n" not in message
    assert load_safe(str(run / "checkpoint.pt"))["epoch"] == 0  # epoch 1's checkpoint, intact
    assert not (run / "model.pt").exists()
    # Through the CLI: one line, exit 2.
    calls["train"] = 0
    rc, _, err_text = cli(capsys, "train", "--data", base["data"], "--category", "texture", "--input-size", "64",
                          "--epochs", "3", "--batch-size", "4", "--flow-steps", "1", "--val-fraction", "0",
                          "--output", tmp_path / "cli-run", "--quiet")
    assert_one_line_error(rc, err_text, "non-finite loss at epoch 2, step 2", "--grad-clip")


def test_gradient_clipping_keeps_a_100x_learning_rate_finite(base, tmp_path):
    samples = load_samples("mvtec", str(base["data"]), "texture", "train")
    res = train(ModelConfig(input_size=(64, 64), flow_steps=2), TrainConfig(epochs=4, batch_size=4, lr=0.1,
                                                                             val_fraction=0, grad_clip=1.0),
                samples, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    nll = [h["train_nll"] for h in res.history]
    assert all(np.isfinite(nll)) and nll[-1] < nll[0]


def test_interrupted_predict_resumes_where_it_stopped(base, predictor, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_rgb()).save(src / f"{i}.png")
    calls = {"n": 0}

    def infer_then_stop(batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return predictor.infer(batch)

    stopping = Predictor(infer_then_stop, predictor.preprocess, predictor.calibration, None, 2, "torch",
                         predictor.source)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict_to_folder(stopping, [str(src)], str(out), batch_size=2, progress=False, log=lambda *a: None)
    assert json.loads((out / "summary.json").read_text())["counts"]["ok"] == 2  # first batch saved
    rc, stdout, err = cli(capsys, "predict", base["run"], src, "--output", out, "--batch-size", "2", "--quiet")
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert "skipping 2 image(s) already done" in stdout
    assert summary["counts"]["ok"] == 5 and summary["counts"]["skipped_this_run"] == 2


# -- outputs stay where the user said ---------------------------------------------------------------
def test_output_names_cannot_escape_the_output_folder(base, tmp_path, capsys):
    names = output_names([Path("/data/../../etc/passwd.png"), Path("/d/..png"), Path("/d/....png"),
                          Path("/d/a/../../b/x.png"), Path("/d/ .. .png"), Path("/d/..\\..\\win.png")])
    for name in names.values():
        assert name and "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name
    src = tmp_path / "inputs" / "deep"
    src.mkdir(parents=True)
    for name in ["..png", "...png", "..evil..png", "..\\..\\win.png", " .. .png"]:
        Image.fromarray(_rgb()).save(src / name, format="PNG")
    out = tmp_path / "inputs" / "out"
    before = set(tmp_path.rglob("*"))
    rc, _, err = cli(capsys, "predict", base["run"], src / "..png", src / "...png", src / "..evil..png",
                     src / "..\\..\\win.png", src / " .. .png", "--output", out, "--quiet")
    assert rc == 0, err
    new = set(tmp_path.rglob("*")) - before
    assert new and all(out.resolve() in p.resolve().parents or p.resolve() == out.resolve() for p in new)
    assert len(list((out / "mask").iterdir())) == 5


def test_output_into_a_closed_pipe_ends_quietly(monkeypatch, tmp_path):
    """`fastflow presets | head -n 0`: no traceback, exit status 141 (128 + SIGPIPE) like a shell tool."""
    from fastflow import cli

    def reader_went_away(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "presets", reader_went_away)
    with open(tmp_path / "stdout", "w") as f:
        monkeypatch.setattr(sys, "stdout", f)
        assert cli.main(["presets"]) == 141
        print("after the pipe broke", file=f)
        f.flush()  # stdout now points at /dev/null: the interpreter's last flush cannot fail again
    assert (tmp_path / "stdout").read_text() == ""
