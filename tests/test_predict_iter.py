"""Predictor.predict_iter (issue 19): a stream over a long input, one batch in memory, per-item errors yielded
in place of results instead of raised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fastflow
from fastflow.predict import Predictor


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return Predictor.from_run(tiny_run[0], device="cpu")


def test_predict_iter_streams_in_order_with_errors_in_place(tiny_run, predictor, tmp_path):
    good = sorted(str(p) for p in Path(tiny_run[1], "test").rglob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    array = np.full((40, 30, 3), 128, np.uint8)
    items = [good[0], str(broken), good[1], np.zeros((5, 5), np.float32), array, good[2], tmp_path / "missing.png"]
    taken = []

    def stream():  # a generator: records how far predict_iter has read when each result comes out
        for item in items:
            taken.append(item)
            yield item

    results, read_when_yielded = [], []
    for r in predictor.predict_iter(stream(), batch_size=2):
        results.append(r)
        read_when_yielded.append(len(taken))
    assert len(results) == len(items)
    # never more than one batch read ahead of the results yielded
    assert all(read <= 2 * (i // 2 + 1) for i, read in enumerate(read_when_yielded))
    assert [r.ok for r in results] == [True, False, True, False, True, True, False]
    reference = predictor.predict([good[0], good[1], array, good[2]])
    for r, ref in zip([results[i] for i in (0, 2, 4, 5)], reference):
        assert r.path == ref.path and r.score == pytest.approx(ref.score, rel=1e-5)
    assert results[4].anomaly_map.shape == (40, 30)
    assert isinstance(results[1], fastflow.PredictionError)
    assert results[1].index == 1 and "broken.png" in results[1].error and results[1].path == str(broken)
    assert results[3].path is None and "uint8" in results[3].error
    assert results[6].index == 6 and "missing.png" in results[6].error
    d = results[1].to_dict()
    assert json.loads(json.dumps(d)) == d and d["status"] == "error"
    assert results[0].to_dict()["status"] == "ok"
    assert "\n" not in repr(results[1]) and "broken.png" in repr(results[1])


def test_predict_iter_on_an_empty_input_yields_nothing(predictor):
    assert list(predictor.predict_iter(iter([]))) == []


def test_images_are_decoded_in_a_pool_in_order_and_outputs_are_lossless(tiny_run, predictor, tmp_path, monkeypatch):
    import threading

    import fastflow.predict as predict_module
    from PIL import Image

    paths = sorted(str(p) for p in Path(tiny_run[1], "test").rglob("*.png"))[:5]
    real, threads = predict_module.load_image, []

    def spy(path):
        threads.append(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(predict_module, "load_image", spy)
    pooled = predictor.predict(paths, batch_size=2)
    assert [r.path for r in pooled] == paths
    assert len(paths) >= 3 and len(threads) == len(paths) and all(name.startswith("fastflow-decode") for name in threads)
    serial = predictor.predict_loaded([(np.asarray(real(p)), p) for p in paths], batch_size=2)
    assert [r.score for r in pooled] == [r.score for r in serial]
    assert predict_module.decode_workers(1) == 1 and 1 <= predict_module.decode_workers(100) <= 8

    # fastflow predict's PNGs (encoded in the same pool, zlib level 1) hold exactly the predicted mask
    summary = predict_module.predict_to_folder(predictor, paths, str(tmp_path / "out"), batch_size=2, progress=False,
                                               log=lambda *a: None)
    by_path = {r["path"]: r for r in summary["results"]}
    for r in serial:
        mask = np.asarray(Image.open(tmp_path / "out" / by_path[r.path]["mask"])) > 0
        assert mask.shape == r.mask.shape and (mask == r.mask).all()
        assert by_path[r.path]["score"] == r.score
