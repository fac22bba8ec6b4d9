"""The HTML report and the non-aligned test set (paper Section 8) of ``fastflow evaluate``."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.cli import main
from fastflow.config import ModelConfig, TrainConfig
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fastflow.demo import make_demo_dataset
from fastflow.evaluate import Scored
from fastflow.misalign import ROTATION_DEGREES, TRANSLATE, ZOOM, Affine, MisalignedDataset, apply_affine, draw_affine
from fastflow.report import THUMB, defect_types_from_paths, per_defect_type, report_path_for, select_galleries
from fastflow.train import train

METRIC_KEYS = {"image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "n_images", "n_normal", "n_anomalous",
               "n_masked", "threshold", "false_alarm_rate", "detection_rate"}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny trained run, evaluated once through the CLI with --report --misalign."""
    root = str(tmp_path_factory.mktemp("data"))
    cat = make_demo_dataset(root, n_train=8, n_test_good=3, n_test_defect=3)
    run_dir = str(tmp_path_factory.mktemp("run"))
    torch.manual_seed(0)
    train(ModelConfig(input_size=(64, 64)), TrainConfig(epochs=1, batch_size=8),
          load_samples("mvtec", root, cat, "train"), run_dir, progress=False, log=lambda *a: None)
    out = tmp_path_factory.mktemp("eval") / "metrics.json"
    rc = main(["evaluate", run_dir, "--data", root, "--category", cat, "--output", str(out), "--report",
               "--misalign", "--quiet"])
    assert rc == 0
    return {"root": root, "cat": cat, "run": run_dir, "metrics": json.loads(out.read_text()),
            "report": out.parent / "report.html"}


# -- the report ------------------------------------------------------------------------------
def test_report_holds_metrics_and_embedded_images(evaluated):
    page = evaluated["report"].read_text()
    m = evaluated["metrics"]
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert f"{m[key]:.4f}" in page and f"{m['misaligned'][key]:.4f}" in page
    for heading in ("Best detections", "Missed anomalies", "False alarms", "Curves", "non-aligned"):
        assert heading in page
    plots = re.findall(r"src='?\"?data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    thumbs = re.findall(r"src='?\"?data:image/jpeg;base64,([A-Za-z0-9+/=]+)", page)
    # curves + histogram; 3 galleries x 3 images (3 anomalous / 3 normal test images, each gallery <= 3 rows)
    assert len(plots) == 2 and len(thumbs) >= 3 * 3
    for data in plots:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "PNG" and im.width > 0
    for data in thumbs[:3]:  # the 64x64 test images, enlarged to THUMB pixels
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            assert im.format == "JPEG" and im.size == (THUMB, THUMB)
    assert "file://" not in page and "<script" not in page  # self-contained


def test_report_shows_the_run_and_a_row_per_defect_type(evaluated):
    page = evaluated["report"].read_text()
    m = evaluated["metrics"]
    assert "<h2>Run</h2>" in page and evaluated["root"] in page and f"category {evaluated['cat']}" in page
    assert "normal images fitted" in page and "held out" in page and "preset efficientnet_lite0" in page
    assert f"{m['threshold']:.4f}, calibrated at a false-alarm rate of 0.01" in page
    rows = {r["defect_type"]: r for r in m["per_defect_type"]}  # also in metrics.json
    assert set(rows) == {"good", "scratch", "spot"} and list(rows)[0] == "good"
    assert sum(r["n_images"] for r in rows.values()) == m["n_images"]
    assert rows["good"]["flagged"] == pytest.approx(m["false_alarm_rate"]) and rows["good"]["image_auroc"] is None
    defects = [rows["scratch"], rows["spot"]]
    assert sum(r["flagged"] * r["n_images"] for r in defects) / m["n_anomalous"] == pytest.approx(m["detection_rate"])
    for r in rows.values():
        assert f"<td>{r['defect_type']}</td><td>{r['label']}</td><td class='num'>{r['n_images']}</td>" in page


def test_per_defect_type_on_hand_values():
    scored = _scored([0.1, 0.5, 0.6, 0.3, 0.05, float("nan")], [0, 0, 1, 1, 1, 1])
    rows = per_defect_type(scored, ["good", "good", "a", "a", "b", "c"], threshold=0.4)
    assert [r["defect_type"] for r in rows] == ["good", "a", "b", "c"]
    good, a, b, c = rows
    assert (good["n_images"], good["median_score"], good["flagged"], good["label"]) == (2, 0.3, 0.5, "normal")
    assert a["image_auroc"] == 0.75 and a["flagged"] == 0.5  # 0.6 beats both normals, 0.3 only 0.1
    assert b["image_auroc"] == 0.0 and b["flagged"] == 0.0
    assert c["image_auroc"] == 1.0 and c["flagged"] == 1.0  # a NaN score counts as the highest
    assert per_defect_type(scored, ["good", "good", "a", "a", "b", "c"], threshold=None)[1]["flagged"] is None
    assert defect_types_from_paths(["/d/test/scratch/000.png", "good/1.png"]) == ["scratch", "good"]


def test_report_path_sits_beside_the_metrics():
    assert report_path_for("/a/b/metrics.json") == "/a/b/report.html"
    assert report_path_for("/a/b/bottle-metrics.json") == "/a/b/bottle-report.html"
    assert report_path_for("/a/b/out.json") == "/a/b/out-report.html"


def _scored(scores, labels) -> Scored:
    n = len(scores)
    return Scored([f"{i}.png" for i in range(n)], np.asarray(scores, float), np.asarray(labels),
                  np.zeros((n, 4, 4), np.float32), np.zeros((n, 4, 4), bool), np.ones(n, bool), 0.0)


def test_galleries_follow_the_threshold():
    scored = _scored([0.1, 0.9, 0.3, 0.8, 0.2, 0.7], [0, 0, 1, 1, 1, 1])
    best, missed, alarms = select_galleries(scored, threshold=0.5)
    assert best[2] == [3, 5, 2, 4]
    assert missed[2] == [4, 2] and "2 anomalous" in missed[1]            # at or below 0.5, lowest first
    assert alarms[2] == [1] and "1 normal" in alarms[1]                   # above 0.5
    _, missed, alarms = select_galleries(scored, threshold=0.05)          # nothing missed: fall back
    assert missed[2] == [4, 2, 5, 3] and "instead" in missed[1] and alarms[2] == [1, 0]
    _, missed, alarms = select_galleries(scored, threshold=None)
    assert missed[2][0] == 4 and alarms[2][0] == 1 and "no threshold" in alarms[1]


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome"))
                    and not os.environ.get("CI"),  # .ci/run installs Chromium: there, a missing one fails
                    reason="needs Chromium (apt-get install -y chromium); .ci/run installs it")
def test_report_renders_in_headless_chromium(evaluated, tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "docs", "render_report.sh")
    png = tmp_path / "report.png"
    subprocess.run(["bash", script, str(evaluated["report"]), str(png), "1280x1600"], check=True, timeout=120,
                   capture_output=True)
    with Image.open(png) as im:
        assert im.size == (1280, 1600)
        assert len(np.unique(np.asarray(im.convert("L").resize((64, 80))))) > 10  # not a blank page
    # by default the window is as tall as the report says it is: the picture holds the last gallery
    height = int(re.search(r'name="fastflow-page-height" content="(\d+)"', evaluated["report"].read_text())[1])
    subprocess.run(["bash", script, str(evaluated["report"]), str(png)], check=True, timeout=120,
                   capture_output=True)
    with Image.open(png) as im:
        assert im.size == (1280, height)


@pytest.mark.skipif(not (shutil.which("chromedriver") and any(shutil.which(b) for b in ("chromium", "chromium-browser",
                                                                                          "google-chrome")))
                    and not os.environ.get("CI"),  # .ci/run installs Chromium and chromedriver
                    reason="needs Chromium and chromedriver (apt-get install -y chromium chromium-driver)")
def test_report_page_height_covers_every_gallery(evaluated):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome")
                                   if shutil.which(b))
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--hide-scrollbars", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)
    try:
        driver.get(evaluated["report"].as_uri())
        actual = driver.execute_script("return document.documentElement.scrollHeight")
        said = int(driver.execute_script("return document.querySelector('meta[name=fastflow-page-height]').content"))
    finally:
        driver.quit()
    assert actual <= said <= actual + 800, (actual, said)  # all of it, without a long blank tail


# -- the non-aligned test set ----------------------------------------------------------------
def test_misaligned_metrics_sit_beside_the_aligned_ones(evaluated):
    m = evaluated["metrics"]
    assert METRIC_KEYS <= set(m) and METRIC_KEYS <= set(m["misaligned"])
    assert m["misaligned"]["n_images"] == 4 * m["n_images"]
    assert m["misaligned"]["n_anomalous"] == 4 * m["n_anomalous"]
    assert m["misaligned"]["protocol"]["copies"] == 4


def _pair(size=32):
    """A square mask and an image equal to it in every channel (a known synthetic pair)."""
    mask = torch.zeros(1, size, size)
    mask[0, 6:14, 9:21] = 1
    return mask.expand(3, -1, -1).clone(), mask


def test_known_transforms_move_image_and_mask_together():
    image, mask = _pair()
    moved_image, moved_mask = apply_affine(image, mask, Affine(0.0, (5, 3), 1.0))
    assert torch.equal(moved_mask[0], torch.roll(mask[0], shifts=(3, 5), dims=(0, 1)))
    assert torch.equal(moved_image, moved_mask.expand(3, -1, -1))
    # 90 degrees about the centre of an even-sized image maps pixel centres onto pixel centres:
    # exact for both; torchvision's affine angle is clockwise, as np.rot90 with k=-1.
    rot_image, rot_mask = apply_affine(image, mask, Affine(90.0, (0, 0), 1.0))
    assert np.array_equal(rot_mask[0].numpy(), np.rot90(mask[0].numpy(), k=-1))
    torch.testing.assert_close(rot_image, rot_mask.expand(3, -1, -1), atol=1e-5, rtol=0)
    # Zoom out by 0.5: the 8x12 box becomes 4x6 around the same centre (16, 16).
    _, small = apply_affine(image, mask, Affine(0.0, (0, 0), 0.5))
    rows, cols = np.nonzero(small[0].numpy())
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (4, 6)


def test_misaligned_dataset_is_4x_seeded_and_transforms_masks_with_images():
    image, mask = _pair()
    base = [{"image": image, "mask": mask, "label": 1, "has_mask": True, "path": f"{i}.png", "index": i}
            for i in range(3)]
    data = MisalignedDataset(base, seed=7)
    assert len(data) == 12
    items = [data[j] for j in range(len(data))]
    again = MisalignedDataset(base, seed=7)
    assert all(torch.equal(a["image"], again[j]["image"]) and torch.equal(a["mask"], again[j]["mask"])
               for j, a in enumerate(items))
    other = MisalignedDataset(base, seed=8)
    assert any(not torch.equal(a["mask"], other[j]["mask"]) for j, a in enumerate(items))
    for j, item in enumerate(items):
        assert (item["source_index"], item["copy"]) == divmod(j, 4)
        m = item["mask"][0] > 0.5
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}   # nearest: still binary
        assert not torch.equal(item["mask"], mask)                  # every copy is moved
        # the bilinear image, thresholded, covers the same pixels as the nearest-resampled mask
        seen = item["image"][0] > 0.5
        iou = (seen & m).sum() / (seen | m).sum()
        assert iou > 0.8, (j, float(iou))


def test_draws_stay_in_the_paper_ranges():
    draws = [draw_affine(0, i, c, (256, 256)) for i in range(50) for c in range(4)]
    assert all(ZOOM[0] <= d.scale <= ZOOM[1] and abs(d.angle) <= ROTATION_DEGREES for d in draws)
    assert all(abs(v) <= round(TRANSLATE * 256) for d in draws for v in d.translate)
    assert draws[0] == draw_affine(0, 0, 0, (256, 256)) and len(set(draws)) == len(draws)


def test_misaligned_real_items_keep_the_dataset_contract(evaluated):
    samples = load_samples("mvtec", evaluated["root"], evaluated["cat"], "test")
    pre = Preprocess((64, 64), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = MisalignedDataset(AnomalyDataset(samples, pre))
    item = data[len(data) - 1]
    assert len(data) == 4 * len(samples)
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert item["label"] == samples[-1].label and item["path"] == samples[-1].path


def test_misalign_fills_uncovered_pixels_with_the_images_border_colour():
    from fastflow.misalign import Affine, apply_affine

    image = torch.full((3, 20, 20), -1.0)  # a dark background ...
    image[:, 5:15, 5:15] = 0.8  # ... around a bright part
    moved, _ = apply_affine(image, torch.zeros(1, 20, 20), Affine(0.0, (6, 0), 1.0))
    assert torch.allclose(moved[:, :, :6], torch.full((3, 20, 6), -1.0))  # not a grey 0-filled band


def test_plots_leave_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    # A notebook user's backend must survive a report or an inversion panel: run both in a fresh interpreter
    # whose backend is "svg" and check it is still "svg" after, with pyplot never imported.
    code = f"""
import sys
import matplotlib
matplotlib.use("svg")
import numpy as np, torch
from fastflow.evaluate import Scored
from fastflow.invert import Generation, panel
from fastflow.report import curves_png, histogram_png
rng = np.random.default_rng(0)
masks = np.zeros((4, 8, 8), bool); masks[2:, 2:5, 2:5] = True
scored = Scored(["a", "b", "c", "d"], np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]),
                rng.random((4, 8, 8)).astype(np.float32), masks, np.ones(4, bool), 0.1)
curves_png(scored, {{}})
histogram_png(scored, 0.5)
f = torch.rand(3, 4, 4)
panel(np.zeros((32, 32, 3)), Generation(f, f, f[0], f, f[0], f, (1, 2, 1, 2)), (8, 8, 16, 16), 0, {str(tmp_path / "p.png")!r})
print(matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in __import__("sys").path if p)}
    out = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False"]
    assert (tmp_path / "p.png").stat().st_size > 1000
