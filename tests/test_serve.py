"""``fastflow serve`` through HTTP against a real uvicorn process: every endpoint, batching, bad uploads, the page.

The server runs the session's tiny 64x64 run in a child process on a free port of 127.0.0.1; answers
are checked against the same run's ``Predictor`` in this process. The browser test drives the system's
headless Chromium (Debian: ``apt-get install -y chromium chromium-driver``) with selenium.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra: pip install 'fastflow[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra: pip install 'fastflow[serve]'")

from fastflow.predict import Predictor  # noqa: E402
from serve_helpers import multipart, post_images, request, start_server, stop_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"
MAX_BATCH = 8
WINDOW_MS = 150  # long enough that requests sent together surely meet in one batch, even on a busy machine
UPLOAD_MB = 1


def png(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def b64_image(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with a metrics.json (so /info has metrics): (run_dir, test images)."""
    src, category = tiny_run
    run_dir = tmp_path_factory.mktemp("serve_run")
    shutil.copy(os.path.join(src, "model.pt"), run_dir / "model.pt")
    (run_dir / "metrics.json").write_text(json.dumps({"image_auroc": 0.75, "pixel_auroc": 0.5, "category": "texture",
                                                      "misaligned": {"image_auroc": 0.5}}))
    test = Path(category) / "test"
    images = sorted(str(p) for p in test.rglob("*.png"))
    return str(run_dir), images


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    proc, url = start_server([run[0], "--max-batch", str(MAX_BATCH), "--batch-window-ms", str(WINDOW_MS),
                              "--max-upload-mb", str(UPLOAD_MB)], tmp_path_factory.mktemp("log") / "serve.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def reference(run):
    return Predictor.from_run(run[0])


def health(url: str) -> dict:
    status, _, body = request(url + "/health")
    assert status == 200
    return json.loads(body)


# -- endpoints --------------------------------------------------------------------------------------
def test_health_says_ok_and_counts(server):
    h = health(server)
    assert h["status"] == "ok" and h["uptime_s"] > 0
    assert h["batching"]["max_batch"] == MAX_BATCH and h["batching"]["window_ms"] == WINDOW_MS


def test_info_describes_model_preprocessing_threshold_and_metrics(server, reference):
    from fastflow import __version__

    status, _, body = request(server + "/info")
    info = json.loads(body)
    assert status == 200 and info["version"] == __version__ and info["runtime"] == "torch"
    assert info["backbone"] == "efficientnet_lite0" and info["input_size"] == [64, 64]
    assert info["preset"] == "custom (efficientnet_lite0)"  # 64x64 is no preset's size
    assert info["preprocessing"] == reference.preprocess.to_dict()
    assert info["threshold"]["value"] == pytest.approx(reference.threshold)
    assert info["threshold"]["source"] == "calibrated"
    assert info["metrics"] == {"image_auroc": 0.75, "pixel_auroc": 0.5, "category": "texture"}  # scalars only
    assert info["serving"]["max_upload_mb"] == UPLOAD_MB and info["quantization"] is None


def test_openapi_documents_the_answers(server):
    status, _, body = request(server + "/openapi.json")
    schema = json.loads(body)
    assert status == 200
    assert {"ImageResult", "PredictResponse", "Health", "Info", "BatchStats"} <= set(schema["components"]["schemas"])
    result = schema["components"]["schemas"]["ImageResult"]["properties"]
    assert {"score", "normalized_score", "is_anomalous", "threshold", "width", "height", "overlay"} <= set(result)
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    status, headers, body = request(server + "/docs")
    assert status == 200 and b"openapi.json" in body


def test_page_is_served_and_self_contained(server):
    status, headers, body = request(server + "/")
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'type="file"' in html and "predict?overlay=1" in html
    assert "http://" not in html and "https://" not in html  # no CDN: the page works offline


def test_several_images_in_one_request_match_the_predictor(server, run, reference):
    paths = run[1][:3]
    status, _, body = post_images(server, [(os.path.basename(p), png(p)) for p in paths])
    assert status == 200
    results = json.loads(body)["results"]
    expected = reference.predict(paths)
    assert [r["filename"] for r in results] == [os.path.basename(p) for p in paths]
    for r, e, p in zip(results, expected, paths):
        # Same model and preprocessing; only the batch composition differs (float reduction order).
        assert r["score"] == pytest.approx(e.score, rel=1e-4, abs=1e-5)
        assert r["normalized_score"] == pytest.approx(e.normalized_score, rel=1e-4, abs=1e-4)
        assert r["is_anomalous"] == e.is_anomalous and r["threshold"] == pytest.approx(reference.threshold)
        with Image.open(p) as im:
            assert (r["width"], r["height"]) == im.size
        assert r["heatmap"] is None and r["overlay"] is None and r["mask"] is None  # only on request


def test_raw_bytes_with_pictures_on_request(server, run, reference):
    path = run[1][-1]
    status, _, body = request(server + "/predict?heatmap=1&overlay=1&mask=1", png(path),
                              {"Content-Type": "image/png"})
    assert status == 200
    (r,) = json.loads(body)["results"]
    e = reference.predict(path)
    heat, over, mask = (b64_image(r[k]) for k in ("heatmap", "overlay", "mask"))
    assert heat.shape == over.shape == (r["height"], r["width"], 3) and mask.shape == (r["height"], r["width"])
    assert set(np.unique(mask)) <= {0, 255}
    assert ((mask > 0) == e.mask).mean() > 0.999  # same threshold on the same map (border pixels may round)
    assert r["filename"] is None


def test_format_png_returns_one_picture_and_the_numbers_in_headers(server, run, reference):
    path = run[1][0]
    status, headers, body = post_images(server, [("a.png", png(path))], "?format=png&picture=mask")
    assert status == 200 and headers["content-type"] == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(body)))
    with Image.open(path) as im:
        assert picture.shape == (im.size[1], im.size[0])
    assert float(headers["x-fastflow-score"]) == pytest.approx(reference.predict(path).score, rel=1e-4, abs=1e-5)
    assert headers["x-fastflow-is-anomalous"] in ("true", "false")


# -- batching ------------------------------------------------------------------------------------------
def test_concurrent_requests_are_answered_and_batched(server, run, reference):
    paths = (run[1] * MAX_BATCH)[:MAX_BATCH + 4]  # more than one batch can hold
    before = health(server)["batching"]
    answers: dict[int, tuple[int, bytes]] = {}
    go = threading.Barrier(len(paths))

    def client(i: int, path: str) -> None:
        go.wait()
        status, _, body = post_images(server, [(f"{i}.png", png(path))])
        answers[i] = (status, body)

    threads = [threading.Thread(target=client, args=(i, p)) for i, p in enumerate(paths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    expected = {p: e.score for p, e in zip(run[1], reference.predict(run[1]))}
    assert sorted(answers) == list(range(len(paths)))
    for i, path in enumerate(paths):
        status, body = answers[i]
        assert status == 200
        (r,) = json.loads(body)["results"]
        assert r["filename"] == f"{i}.png" and r["score"] == pytest.approx(expected[path], rel=1e-4, abs=1e-5)
    after = health(server)["batching"]
    batches, images = after["batches"] - before["batches"], after["images"] - before["images"]
    assert images == len(paths)
    assert after["largest_batch"] <= MAX_BATCH
    assert batches < len(paths) and after["largest_batch"] >= 2, after  # several requests shared a model call


# -- bad uploads ------------------------------------------------------------------------------------------
def _bad_requests(good: bytes) -> dict[str, tuple[int, bytes, dict, str]]:
    """name -> (expected status, body, headers, query)."""
    big = good + os.urandom(UPLOAD_MB * 2**20)  # over the limit
    cases = {
        "not_an_image": (422, *multipart([("file", "notes.png", b"this is text, not a picture")]), ""),
        "truncated": (422, *multipart([("file", "cut.png", good[: len(good) // 2])]), ""),
        "empty_file": (400, *multipart([("file", "empty.png", b"")]), ""),
        "too_large": (413, *multipart([("file", "big.png", big)]), ""),
        "wrong_field": (400, *multipart([("image", "a.png", good)]), ""),
        "text_field": (400, *multipart([("file", None, b"a.png")]), ""),
        "no_parts": (400, *multipart([]), ""),
        "raw_empty": (400, b"", {"Content-Type": "image/png"}, ""),
        "raw_garbage": (422, b"\x89PNG garbage", {"Content-Type": "image/png"}, ""),
        "wrong_content_type": (415, good, {"Content-Type": "text/plain"}, ""),
        "png_for_two_images": (400, *multipart([("file", "a.png", good), ("file", "b.png", good)]), "?format=png"),
        "bad_query": (422, *multipart([("file", "a.png", good)]), "?format=gif"),
    }
    return cases


BAD = list(_bad_requests(b"").keys())


@pytest.mark.parametrize("case", BAD)
def test_bad_upload_gets_a_one_line_4xx_and_the_server_keeps_serving(server, run, case):
    good = png(run[1][0])
    expected, body, headers, query = _bad_requests(good)[case]
    status, answer_headers, answer = request(f"{server}/predict{query}", body, headers, method="POST")
    detail = json.loads(answer)["detail"]
    assert status == expected, detail
    assert answer_headers["content-type"] == "application/json"
    assert isinstance(detail, str) and detail and "\n" not in detail and len(detail) < 300
    status, _, answer = post_images(server, [("ok.png", good)])  # and the next client is served
    assert status == 200 and len(json.loads(answer)["results"]) == 1


def test_rejections_are_counted(server, run):
    before = health(server)
    request(server + "/predict", b"", {"Content-Type": "text/plain"}, method="POST")
    after = health(server)
    assert after["requests"] == before["requests"] + 1 and after["rejected"] == before["rejected"] + 1


def test_missing_extra_is_one_line_naming_it(run, monkeypatch, capsys):
    from fastflow.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # what `import fastapi` meets when the extra is absent
    monkeypatch.delitem(sys.modules, "fastflow.serve", raising=False)
    assert main(["serve", run[0]]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "fastflow[serve]" in lines[0] and lines[0].startswith("fastflow serve: error:")


# -- the page in a real browser ---------------------------------------------------------------------------
def chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of the system's Chromium and chromedriver, or None."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def drive_page(url: str, images: list[str], screenshot: str, size: tuple[int, int] = (1280, 900)) -> list[dict]:
    """Open the page in headless Chromium, upload ``images`` through the file input, wait for every card,
    save a screenshot; returns what each card shows (decision, score, threshold, overlay size)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must never try to download a browser or driver
    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--hide-scrollbars",
                 f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 60).until(lambda d: "threshold" in d.find_element(By.ID, "model").text)
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(images))
        done = ("return Array.from(document.querySelectorAll('.card.normal, .card.anomalous, .card.error'))"
                ".filter(c => c.classList.contains('error') || c.querySelector('img.overlay').naturalWidth > 0).length")
        WebDriverWait(driver, 180).until(lambda d: d.execute_script(done) == len(images))
        cards = driver.execute_script(
            "return Array.from(document.querySelectorAll('.card')).map(c => ({cls: c.className, "
            "name: c.querySelector('.name').textContent, decision: c.querySelector('.decision').textContent, "
            "score: (c.querySelector('.score') || {}).textContent, threshold: (c.querySelector('.threshold') || {})"
            ".textContent, overlay: c.querySelector('img.overlay').naturalWidth, msg: c.textContent}))")
        time.sleep(0.3)  # let the last images paint
        driver.save_screenshot(screenshot)
        return cards
    finally:
        driver.quit()


def page_images(run_images: list[str], tmp: Path) -> list[str]:
    """A bottle test image (and a good one) from the shared data when present, else synthetic PNGs."""
    picks = [BOTTLE / "broken_large" / "000.png", BOTTLE / "good" / "001.png"]  # distinct names
    if all(p.is_file() for p in picks):
        return [str(p) for p in picks]
    return run_images[:2]


@pytest.mark.skipif(chromium() is None and not os.environ.get("CI"),
                    reason="needs Chromium and chromedriver (apt-get install -y chromium chromium-driver); "
                           ".ci/run installs them")
def test_page_in_headless_chromium_shows_overlay_score_and_decision(server, run, reference, tmp_path):
    images = page_images(run[1], tmp_path)
    shot = tmp_path / "serve-page.png"
    cards = drive_page(server, images, str(shot))
    assert len(cards) == 2 and all("error" not in c["cls"] for c in cards), cards
    expected = {os.path.basename(p): e for p, e in zip(images, reference.predict(images))}
    for card in cards:
        e = expected[card["name"]]
        assert card["decision"] == ("ANOMALOUS" if e.is_anomalous else "NORMAL")
        assert float(card["score"]) == pytest.approx(e.score, abs=1e-3)
        assert float(card["threshold"]) == pytest.approx(reference.threshold, abs=1e-3)
        with Image.open([p for p in images if os.path.basename(p) == card["name"]][0]) as im:
            assert card["overlay"] == im.size[0]  # the overlay came back at the image's size and was drawn
    with Image.open(shot) as im:
        assert im.size[0] >= 1000
        assert len(np.unique(np.asarray(im.convert("L").resize((64, 48))))) > 10  # not a blank page
