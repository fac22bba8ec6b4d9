"""Predictor and ``fastflow predict``: shapes at each image's own size, thresholds, files, re-runs."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from fastflow.cli import main
from fastflow.predict import Predictor, collect_inputs, output_names


@pytest.fixture(scope="module")
def run(tiny_run):
    """(run_dir, category folder of the synthetic set)."""
    return tiny_run


@pytest.fixture(scope="module")
def predictor(run):
    return Predictor.from_run(run[0])


def test_paths_and_arrays_give_maps_at_their_own_size(predictor, run):
    path = os.path.join(run[1], "test", "scratch", "000.png")
    rgb = np.asarray(Image.open(path).convert("RGB"))
    wide = np.asarray(Image.fromarray(rgb).resize((200, 90)))
    grey = rgb[:50, :70, 0].copy()
    results = predictor.predict([path, rgb, wide, grey])
    own = rgb.shape[:2]  # the demo's crop size
    assert [r.anomaly_map.shape for r in results] == [own, own, (90, 200), (50, 70)]
    assert all(r.anomaly_map.dtype == np.float32 and r.mask.dtype == bool for r in results)
    assert results[0].path == path and results[1].path is None
    # A file and its decoded pixels are the same input.
    assert results[0].score == pytest.approx(results[1].score, rel=1e-6)
    np.testing.assert_allclose(results[0].anomaly_map, results[1].anomaly_map, rtol=1e-6)
    single = predictor.predict(path)  # one image in, one result out
    assert single.score == pytest.approx(results[0].score, rel=1e-6)


def test_decision_and_normalized_score_follow_the_threshold(run, predictor):
    image = os.path.join(run[1], "test", "spot", "001.png")
    r = predictor.predict(image)
    m, t = predictor.val_median, predictor.threshold
    assert predictor.threshold_source == "calibrated" and math.isfinite(t) and m < t
    assert r.normalized_score == pytest.approx((r.score - m) / (t - m))
    assert r.is_anomalous == (r.score > t)
    np.testing.assert_array_equal(r.mask, r.anomaly_map > t)
    # A user threshold overrides the calibrated one: just below / above this image's score.
    assert predictor.with_threshold(r.score - 1e-3).predict(image).is_anomalous
    assert not predictor.with_threshold(r.score + 1e-3).predict(image).is_anomalous
    # The normal median stays the reference: doubling the threshold's distance halves normalized scores.
    farther = predictor.with_threshold(m + 2 * (t - m)).predict(image)
    assert farther.normalized_score == pytest.approx(r.normalized_score / 2)
    assert math.isnan(predictor.with_threshold(m - 1.0).predict(image).normalized_score)  # undefined below m


def test_bad_array_is_a_clear_error(predictor):
    with pytest.raises(ValueError, match="uint8"):
        predictor.predict(np.zeros((8, 8, 3), dtype=np.float32))


def test_output_names_stay_inside_and_are_unique(tmp_path):
    paths = [tmp_path / "a" / "001.png", tmp_path / "b" / "001.png", tmp_path / "b" / "..x..png",
             tmp_path / "c" / "weird name?.png"]
    names = output_names(paths)
    assert sorted(names.values()) == sorted(["a__001", "b__001", "x", "weird_name_"])
    assert all("/" not in n and not n.startswith(".") for n in names.values())
    # Names of an earlier run are kept for their paths and avoided for others.
    again = output_names([tmp_path / "d" / "x.png"], {"/elsewhere/x.png": "x"})
    assert list(again.values()) == ["x-2"]


def test_collect_inputs_files_folders_globs(tmp_path):
    (tmp_path / "f" / "sub").mkdir(parents=True)
    (tmp_path / "f" / ".hidden").mkdir()
    for rel in ["f/a.png", "f/sub/b.JPG", "f/.c.png", "f/.hidden/d.png", "f/notes.txt", "e.png"]:
        (tmp_path / rel).write_bytes(b"x")
    got = collect_inputs([str(tmp_path / "f"), str(tmp_path / "*.png"), str(tmp_path / "f" / "a.png")])
    assert [p.name for p in got] == ["a.png", "b.JPG", "e.png"]
    with pytest.raises(FileNotFoundError, match="not a file, a folder or a glob"):
        collect_inputs([str(tmp_path / "missing*.png")])


def test_cli_predict_reports_bad_files_and_skips_done_images(run, tmp_path, capsys):
    src = tmp_path / "in"
    (src / "good").mkdir(parents=True)
    (src / "bad").mkdir()
    test = os.path.join(run[1], "test")
    Image.open(os.path.join(test, "good", "000.png")).save(src / "good" / "000.png")
    Image.open(os.path.join(test, "scratch", "000.png")).resize((120, 80)).save(src / "bad" / "000.png")
    Image.open(os.path.join(test, "spot", "001.png")).save(src / "..sneaky..png")  # hidden: only if named
    (src / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    args = ["predict", run[0], str(src), str(src / "..sneaky..png"), "--output", str(out), "--quiet",
            "--batch-size", "2"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    by_name = {os.path.basename(r["path"]): r for r in summary["results"]}  # the two 000.png collide: unused
    anomalous = sum(r["status"] == "ok" and bool(r["is_anomalous"]) for r in summary["results"])
    assert summary["counts"] == {"images": 4, "ok": 3, "error": 1, "anomalous": anomalous, "skipped_this_run": 0}
    assert by_name["broken.png"]["status"] == "error" and "broken.png" in by_name["broken.png"]["error"]
    for r in summary["results"]:
        if r["status"] != "ok":
            continue
        for kind in ("heatmap", "overlay", "mask"):
            target = (out / r[kind]).resolve()
            assert target.is_file() and str(target).startswith(str(out.resolve()) + os.sep)
    # Outputs are at the image's own size; duplicate stems are disambiguated by folder.
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok", "error"}
    mask_files = sorted(os.listdir(out / "mask"))
    assert "bad__000.png" in mask_files and "good__000.png" in mask_files and "sneaky.png" in mask_files
    assert Image.open(out / "mask" / "bad__000.png").size == (120, 80)
    assert Image.open(out / "heatmap" / "bad__000.png").size == (120, 80)
    scale = summary["heatmap_scale"]
    t = summary["threshold"]
    assert scale["low"] == pytest.approx(t["val_median"]) and scale["high"] == pytest.approx(
        2 * t["value"] - t["val_median"])

    # Re-run: everything done is skipped; the broken file is retried (and fails again).
    capsys.readouterr()
    assert main(args) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["counts"]["skipped_this_run"] == 3 and again["counts"]["images"] == 4
    assert "skipping 3" in capsys.readouterr().out
    # A different threshold invalidates earlier results.
    assert main(args + ["--threshold", "1e9"]) == 0
    third = json.loads((out / "summary.json").read_text())
    assert third["counts"]["skipped_this_run"] == 0 and third["counts"]["anomalous"] == 0


def test_cli_predict_user_errors(run, tmp_path, capsys):
    assert main(["predict", run[0], str(tmp_path / "nope.png"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.png" in err
    image = os.path.join(run[1], "test", "good", "000.png")
    assert main(["predict", run[0], image, "--output", str(tmp_path / "o"), "--runtime", "onnx",
                 "--onnx", str(tmp_path / "m.onnx")]) == 2
    assert "fastflow export" in capsys.readouterr().err


def test_a_nan_score_is_reported_anomalous_with_a_warning():
    from fastflow.data import Preprocess

    def infer(batch):  # a model whose output is NaN for this batch
        b, _, h, w = batch.shape
        return np.full(b, np.nan, np.float32), np.full((b, 1, h, w), np.nan, np.float32)

    pred = Predictor(infer, Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3), {"value": 1.0, "val_median": 0.5})
    with pytest.warns(RuntimeWarning, match="NaN"):
        result = pred.predict(np.zeros((40, 50, 3), np.uint8))
    assert math.isnan(result.score) and result.is_anomalous is True and result.mask.all()
