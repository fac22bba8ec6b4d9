"""fastflow benchmark (issue 19): latency and throughput of a run, in torch and ONNX Runtime, on a tiny run
with a few iterations (the figures themselves depend on the machine; their shape and bookkeeping do not)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastflow.benchmark import benchmark_images, measure
from fastflow.cli import main
from fastflow.predict import Predictor
from helpers import cli




def _check_stats(stats: dict, batch_size: int) -> None:
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    # both figures are rounded (median to 0.001 ms, rate to 0.01 img/s): a slow, loaded machine makes the rate small
    assert stats["images_per_s"] == pytest.approx(batch_size * 1000.0 / stats["median_ms"], rel=1e-3, abs=0.006)


def test_measure_times_the_torch_runtime_and_says_why_onnx_is_missing(tiny_run):
    run, _ = tiny_run
    result = measure(run, batch_size=2, iterations=3, warmup=1, runtime="all", device="cpu")
    assert list(result["runtimes"]) == ["torch"]
    for part in ("model", "end_to_end"):
        _check_stats(result["runtimes"]["torch"][part], 2)
    assert "model.onnx not found" in result["skipped"]["onnx"] and "fastflow export" in result["skipped"]["onnx"]
    assert result["input_size"] == [64, 64] and result["images"] == "synthetic"
    assert result["machine"]["device"] == "cpu" and result["machine"]["threads"] >= 1


def test_synthetic_images_are_at_the_input_size_and_folder_images_repeat(tiny_run, tmp_path):
    predictor = Predictor.from_run(tiny_run[0], device="cpu")
    synthetic = benchmark_images(predictor, 3)
    assert [rgb.shape for rgb, _ in synthetic] == [(64, 64, 3)] * 3
    assert np.array_equal(synthetic[0][0], benchmark_images(predictor, 1)[0][0])  # seeded
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "b.png")
    shapes = [rgb.shape for rgb, _ in benchmark_images(predictor, 5, str(tmp_path))]
    assert shapes == [(40, 50, 3), (30, 20, 3)] * 2 + [(40, 50, 3)]


def test_benchmark_cli_prints_a_table_and_writes_json(tiny_run, tmp_path, capsys):
    run, category = tiny_run
    out_json = tmp_path / "sub" / "bench.json"
    rc, out, err = cli(capsys, "benchmark", run, "--batch-size", 2, "--iterations", 2, "--warmup", 0,
                       "--runtime", "torch", "--device", "cpu", "--threads", 1,
                       "--images", Path(category, "test"), "--json", out_json)
    assert rc == 0, err
    saved = json.loads(out_json.read_text())
    assert saved["batch_size"] == 2 and saved["iterations"] == 2 and saved["machine"]["threads"] == 1
    assert saved["images"] == str(Path(category, "test")) and saved["skipped"] == {}
    median = saved["runtimes"]["torch"]["end_to_end"]["median_ms"]
    assert f"{median:.2f}" in out and "torch" in out and "p90" in out


def test_benchmark_onnx_without_an_export_is_a_one_line_error(tiny_run, capsys):
    rc, out, err = cli(capsys, "benchmark", tiny_run[0], "--runtime", "onnx", "--iterations", 1)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "fastflow export" in err and "model.onnx" in err


def test_benchmark_bad_counts_are_refused(tiny_run, capsys):
    rc, _, err = cli(capsys, "benchmark", tiny_run[0], "--iterations", 0)
    assert rc == 2 and "must be > 0" in err
    with pytest.raises(ValueError, match="warmup must be at least 0"):
        measure(tiny_run[0], warmup=-1)


@pytest.mark.export
def test_benchmark_times_onnx_runtime_after_export(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    assert main(["export", str(run), "--format", "onnx"]) == 0
    rc, out, err = cli(capsys, "benchmark", run, "--iterations", 2, "--warmup", 1, "--device", "cpu",
                       "--json", tmp_path / "b.json")
    assert rc == 0, err
    saved = json.loads((tmp_path / "b.json").read_text())
    assert list(saved["runtimes"]) == ["torch", "onnx"] and saved["skipped"] == {}
    _check_stats(saved["runtimes"]["onnx"]["model"], 1)
    assert "onnxruntime" in saved["machine"]
