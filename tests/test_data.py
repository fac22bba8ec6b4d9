"""Tests of the data layer on tiny synthetic datasets built in tmp_path (never the real data)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from fastflow.data import (AnomalyDataset, DatasetError, Preprocess, Sample, augment_pair, check_readable,
                           list_categories, load_image, load_mask, load_samples)

PLAIN = Preprocess((16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # identity normalisation: image = pixel / 255


def _img(path: Path, size=(8, 8), value=100, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def _mask(path: Path, size=(8, 8), box=(2, 2, 6, 6)) -> Path:
    array = np.zeros((size[1], size[0]), np.uint8)
    array[box[1]:box[3], box[0]:box[2]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _junk(folder: Path) -> None:
    """Files every loader must ignore."""
    for name in (".DS_Store", "Thumbs.db", "notes.txt", "._000.png"):
        (folder / name).write_bytes(b"junk")


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    cat = tmp_path / "mvtec" / "widget"
    for i in range(3):
        _img(cat / "train" / "good" / f"{i:03d}.png")
    _img(cat / "test" / "good" / "000.png")
    for defect in ("crack", "scratch"):
        for i in range(2):
            _img(cat / "test" / defect / f"{i:03d}.PNG")
            _mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    _junk(cat / "train" / "good")
    _junk(cat / "test" / "crack")
    (tmp_path / "mvtec" / "not_a_category").mkdir()
    return tmp_path / "mvtec"


# ---------------------------------------------------------------- mvtec


def test_mvtec_train_and_test(mvtec: Path) -> None:
    train = load_samples("mvtec", str(mvtec), "widget", "train")
    assert [Path(s.path).name for s in train] == ["000.png", "001.png", "002.png"]
    assert {s.label for s in train} == {0}
    test = load_samples("mvtec", str(mvtec), "widget", "test")
    assert len(test) == 5
    defects = [s for s in test if s.label == 1]
    assert sorted({s.defect_type for s in defects}) == ["crack", "scratch"]
    for s in defects:
        assert Path(s.mask_path).name == Path(s.path).stem + "_mask.png"
        assert Path(s.mask_path).parent.name == s.defect_type
    assert [s.mask_path for s in test if s.label == 0] == [None]
    assert list_categories("mvtec", str(mvtec)) == ["widget"]
    assert len(load_samples("mvtec", str(mvtec / "widget"), "widget", "train")) == 3  # root = category folder


def test_mvtec_without_ground_truth_is_image_level(mvtec: Path) -> None:
    for mask in (mvtec / "widget" / "ground_truth").rglob("*.png"):
        mask.unlink()
    for folder in (mvtec / "widget" / "ground_truth").iterdir():
        folder.rmdir()
    (mvtec / "widget" / "ground_truth").rmdir()
    defects = [s for s in load_samples("mvtec", str(mvtec), "widget", "test") if s.label == 1]
    assert len(defects) == 4
    assert all(s.mask_path is None and not s.has_mask for s in defects)


def test_mvtec_missing_mask_is_listed(mvtec: Path) -> None:
    (mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)1 defect image\(s\) have no mask.*001\.PNG.*Add the missing masks"):
        load_samples("mvtec", str(mvtec), "widget", "test")


def test_mvtec_orphan_mask_is_listed(mvtec: Path) -> None:
    _mask(mvtec / "widget" / "ground_truth" / "scratch" / "007_mask.png")
    with pytest.raises(DatasetError, match=r"(?s)have no matching defect image.*007_mask\.png"):
        load_samples("mvtec", str(mvtec), "widget", "test")


def test_mvtec_errors(mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"category 'widgit' not found.*available: widget"):
        load_samples("mvtec", str(mvtec), "widgit", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        load_samples("mvtec", str(tmp_path / "nowhere"), "widget", "train")
    with pytest.raises(DatasetError, match="unknown dataset format 'mvtek'.*mvtec"):
        load_samples("mvtek", str(mvtec), "widget", "train")
    with pytest.raises(DatasetError, match="split must be one of"):
        load_samples("mvtec", str(mvtec), "widget", "val")
    with pytest.raises(DatasetError, match="does not take option"):
        load_samples("mvtec", str(mvtec), "widget", "train", mask_dir="x")
    for image in (mvtec / "widget" / "train" / "good").glob("*.png"):
        image.unlink()  # only junk left: the category is empty
    with pytest.raises(DatasetError, match="no normal training images.*train/good"):
        load_samples("mvtec", str(mvtec), "widget", "train")


# ---------------------------------------------------------------- btad


def test_btad_masks_png_or_bmp(tmp_path: Path) -> None:
    cat = tmp_path / "btad" / "01"
    for i in range(2):
        _img(cat / "train" / "ok" / f"{i:04d}.bmp")
    _img(cat / "test" / "ok" / "0000.bmp")
    _img(cat / "test" / "ko" / "0000.bmp")
    _img(cat / "test" / "ko" / "0001.bmp")
    _mask(cat / "ground_truth" / "ko" / "0000.png")
    _mask(cat / "ground_truth" / "ko" / "0001.bmp")
    assert len(load_samples("btad", str(tmp_path / "btad"), "1", "train")) == 2  # "1" means "01"
    test = load_samples("btad", str(tmp_path / "btad"), "01", "test")
    assert [(s.label, Path(s.mask_path).name if s.mask_path else None) for s in test] == [
        (0, None), (1, "0000.png"), (1, "0001.bmp")]
    assert list_categories("btad", str(tmp_path / "btad")) == ["01"]
    (cat / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(DatasetError, match=r"(?s)ground_truth/ko/<stem>\.png or \.bmp.*0001\.bmp"):
        load_samples("btad", str(tmp_path / "btad"), "01", "test")


# ---------------------------------------------------------------- folder


def test_folder_split_rule_and_mask_dir(tmp_path: Path) -> None:
    for i in range(10):
        _img(tmp_path / "ok" / f"n{i:02d}.jpg")
    for name in ("a", "b"):
        _img(tmp_path / "nok" / f"{name}.jpg")
        _mask(tmp_path / "gt" / f"{name}_m.png")
    options = dict(normal_dirs=["ok"], abnormal_dirs=[str(tmp_path / "nok")], mask_dir="gt",
                   mask_suffix="_m.png", test_fraction=0.25)  # k = round(1 / 0.25) = 4
    train = load_samples("folder", str(tmp_path), "mine", "train", **options)
    test = load_samples("folder", str(tmp_path), "mine", "test", **options)
    assert [Path(s.path).stem for s in test if s.label == 0] == ["n00", "n04", "n08"]
    assert len(train) == 7 and not {s.path for s in train} & {s.path for s in test}
    assert [(s.defect_type, Path(s.mask_path).name) for s in test if s.label == 1] == [("nok", "a_m.png"),
                                                                                       ("nok", "b_m.png")]
    default = load_samples("folder", str(tmp_path), "mine", "test", normal_dirs=["ok"])  # test_fraction 0.2
    assert [Path(s.path).stem for s in default] == ["n00", "n05"]
    (tmp_path / "gt" / "b_m.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)no mask.*b\.jpg"):
        load_samples("folder", str(tmp_path), "mine", "test", **options)


def test_folder_errors(tmp_path: Path) -> None:
    _img(tmp_path / "ok" / "n.png")
    with pytest.raises(DatasetError, match="needs normal_dirs"):
        load_samples("folder", str(tmp_path), "mine", "train")
    with pytest.raises(DatasetError, match="abnormal image folder .*missing does not exist"):
        load_samples("folder", str(tmp_path), "mine", "test", normal_dirs=["ok"], abnormal_dirs=["missing"])
    with pytest.raises(DatasetError, match="test_fraction"):
        load_samples("folder", str(tmp_path), "mine", "train", normal_dirs=["ok"], test_fraction=0.9)


def _mtd_tree(base: Path, normals: int = 12) -> None:
    for i in range(normals):
        _img(base / "MT_Free" / "Imgs" / f"exp{i:02d}.jpg", mode="L")
        _img(base / "MT_Free" / "Imgs" / f"exp{i:02d}.png", value=0, mode="L")  # all-zero mask, ignored
    for defect in ("Blowhole", "Crack"):
        for i in range(2):
            _img(base / f"MT_{defect}" / "Imgs" / f"d{i}.jpg", mode="L")
            _mask(base / f"MT_{defect}" / "Imgs" / f"d{i}.png")
    _junk(base / "MT_Free" / "Imgs")


def test_mtd_split_and_masks(tmp_path: Path) -> None:
    base = tmp_path / "magnetic_tile"
    _mtd_tree(base)
    train = load_samples("mtd", str(base), "magnetic_tile", "train")
    test = load_samples("mtd", str(tmp_path), "magnetic_tile", "test")  # root/category works too
    assert [Path(s.path).name for s in test if s.label == 0] == ["exp00.jpg", "exp05.jpg", "exp10.jpg"]
    assert len(train) == 9 and all(s.path.endswith(".jpg") and s.label == 0 for s in train)
    defects = [s for s in test if s.label == 1]
    assert [(s.defect_type, Path(s.mask_path).name) for s in defects] == [
        ("Blowhole", "d0.png"), ("Blowhole", "d1.png"), ("Crack", "d0.png"), ("Crack", "d1.png")]
    assert all(Path(s.mask_path).parent == Path(s.path).parent for s in defects)
    assert load_samples("mtd", str(base), "all", "train") == train
    assert list_categories("mtd", str(base)) == ["magnetic_tile"]
    # the same tree through the folder format: the Magnetic Tile layout is masks beside images
    same = load_samples("folder", str(base), "mt", "test", normal_dirs=["MT_Free/Imgs"],
                        abnormal_dirs=["MT_Crack/Imgs"])
    assert [s.mask_path is not None for s in same] == [False] * 3 + [True] * 2


def test_mtd_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="one of magnetic_tile, mtd, all"):
        load_samples("mtd", str(tmp_path), "tiles", "train")
    with pytest.raises(DatasetError, match="no MT_Free folder"):
        load_samples("mtd", str(tmp_path), "mtd", "train")
    _mtd_tree(tmp_path)
    (tmp_path / "MT_Crack" / "Imgs" / "d1.png").unlink()
    with pytest.raises(DatasetError, match=r"(?s)no mask.*MT_Crack/Imgs/d1\.jpg"):
        load_samples("mtd", str(tmp_path), "mtd", "test")


# ---------------------------------------------------------------- cifar10

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar(folder: Path) -> np.ndarray:
    """Two train batches and a test batch of 4 images each; returns the test images (N, 32, 32, 3)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(4, 3072)  # CIFAR stores R plane, G plane, B plane
    batches = {"data_batch_1": [1, 3, 1, 0], "data_batch_2": [3, 3, 2, 9], "test_batch": [3, 0, 9, 3]}
    for name, labels in batches.items():
        with (folder / name).open("wb") as f:
            pickle.dump({b"data": rows, b"labels": labels}, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f)
    return images


def test_cifar10(tmp_path: Path) -> None:
    images = _cifar(tmp_path / "cifar-10-batches-py")
    train = load_samples("cifar10", str(tmp_path), "cat", "train")  # parent of the batches folder
    assert [s.path for s in train] == ["cifar10/train/000001", "cifar10/train/000004", "cifar10/train/000005"]
    np.testing.assert_array_equal(train[0].array, images[1])
    test = load_samples("cifar10", str(tmp_path / "cifar-10-batches-py"), "3", "test")
    assert [(s.label, s.defect_type) for s in test] == [(0, "good"), (1, "airplane"), (1, "truck"), (0, "good")]
    assert test[2].path == "cifar10/test/000002" and test[2].array.shape == (32, 32, 3)
    assert list_categories("cifar10", str(tmp_path)) == CLASSES
    with pytest.raises(DatasetError, match="category 'cow' not found.*airplane"):
        load_samples("cifar10", str(tmp_path), "cow", "train")
    with pytest.raises(DatasetError, match="no normal training images"):
        load_samples("cifar10", str(tmp_path), "frog", "train")  # no frog in the train batches
    with pytest.raises(DatasetError, match="no CIFAR-10 batches"):
        load_samples("cifar10", str(tmp_path.parent), "cat", "train")
    item = AnomalyDataset(test, PLAIN)[2]
    assert item["image"].shape == (3, 16, 16) and item["has_mask"] is False


# ---------------------------------------------------------------- image reading


def test_load_image_modes(tmp_path: Path) -> None:
    grey = load_image(_img(tmp_path / "l.png", value=77, mode="L"))
    assert grey.mode == "RGB" and np.asarray(grey)[0, 0].tolist() == [77, 77, 77]
    rgba = Image.new("RGBA", (4, 1), (10, 20, 30, 255))
    rgba.putpixel((3, 0), (200, 200, 200, 0))  # fully transparent: composited over black
    rgba.save(tmp_path / "rgba.png")
    assert np.asarray(load_image(tmp_path / "rgba.png"))[0].tolist() == [[10, 20, 30]] * 3 + [[0, 0, 0]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 250, 10, 5] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[0].tolist() == [[0, 0, 0], [250, 10, 5]]
    Image.fromarray(np.array([[0, 32896, 65535, 257]], np.uint16)).save(tmp_path / "16.png")
    assert np.asarray(load_image(tmp_path / "16.png"))[0, :, 0].tolist() == [0, 128, 255, 1]  # scaled, not clipped
    Image.new("RGB", (2, 2), (200, 100, 50)).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert np.asarray(load_image(tmp_path / "cmyk.tif"))[0, 0].tolist() == [200, 100, 50]


def test_load_image_exif_orientation(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the left half ends on top
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "rot.jpg")
    assert upright.size == (10, 20)
    top, bottom = np.asarray(upright)[2, 5], np.asarray(upright)[17, 5]
    assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_unreadable_images_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = _img(tmp_path / "good.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match=r"zero\.png is empty \(0 bytes\)"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(DatasetError, match=r"text\.png is not an image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(DatasetError, match=r"cut\.png is truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DatasetError, match=r"mask .*text\.png is not an image"):
        load_mask(tmp_path / "text.png")


def test_check_readable_lists_all_problems(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "bad_mask.png").write_text("nope")
    samples = [Sample(str(_img(tmp_path / "ok.png")), 0, "good"), Sample(str(tmp_path / "zero.png"), 0, "good"),
               Sample(str(_img(tmp_path / "d.png")), 1, "crack", str(tmp_path / "bad_mask.png")),
               Sample(str(tmp_path / "gone.png"), 0, "good")]
    with pytest.raises(DatasetError, match=r"(?s)3 of 5 files cannot be read.*zero\.png.*gone\.png.*bad_mask\.png"):
        check_readable(samples)
    check_readable(samples[:1])


# ---------------------------------------------------------------- preprocessing


def test_preprocess_normalises_and_round_trips(tmp_path: Path) -> None:
    pre = Preprocess((12, 20), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    array = np.full((30, 40, 3), 255, np.uint8)
    out = pre(array)
    assert out.shape == (3, 12, 20) and out.dtype == torch.float32
    assert out[:, 0, 0].tolist() == [2.0, 1.0, 0.5]
    assert torch.equal(pre(Image.fromarray(array)), out)
    assert Preprocess.from_dict(pre.to_dict()) == pre
    assert pre.to_dict()["input_size"] == [12, 20]
    with pytest.raises(ValueError, match="unknown keys"):
        Preprocess.from_dict({**pre.to_dict(), "crop": 3})
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocess((8, 8), (0, 0, 0), (1, 1, 1), resize="fancy")


def test_autocontrast_stretches_each_image_before_resizing() -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 70, 40)[None, :] + rng.normal(0, 1, size=(30, 40))
    dark = np.clip(ramp, 40, 70).astype(np.uint8)  # a dark, low-contrast grey part
    grey = np.repeat(dark[:, :, None], 3, axis=2)
    off = Preprocess((12, 16), (0, 0, 0), (1, 1, 1))
    on = Preprocess((12, 16), (0, 0, 0), (1, 1, 1), autocontrast=1.0)
    plain, stretched = off.resize_image(grey), on.resize_image(grey)
    assert plain.max() <= 70 and np.ptp(plain) < 31
    assert stretched.min() < 10 and stretched.max() > 245  # the full range after the stretch
    expected = Image.fromarray(np.asarray(ImageOps.autocontrast(Image.fromarray(grey), cutoff=1.0)))
    assert np.array_equal(stretched, np.asarray(expected.resize((16, 12), Image.Resampling.BILINEAR)))
    # on a colour image one tone curve serves every channel: colours keep their order (no per-channel stretch)
    colour = np.stack([dark, dark // 2, dark // 4], axis=2)
    out = on.resize_image(colour).astype(int)
    assert (out[..., 0] >= out[..., 1]).all() and (out[..., 1] >= out[..., 2]).all()
    assert Preprocess.from_dict(on.to_dict()) == on and on.to_dict()["autocontrast"] == 1.0
    old = {k: v for k, v in off.to_dict().items() if k != "autocontrast"}  # a checkpoint from before the option
    assert Preprocess.from_dict(old).autocontrast is None
    for bad in (-1.0, 50.0):
        with pytest.raises(ValueError, match="autocontrast must be a cut-off percent"):
            Preprocess((8, 8), (0, 0, 0), (1, 1, 1), autocontrast=bad)
    # histogram equalisation instead: Pillow's, per channel, before the resize
    eq = Preprocess((12, 16), (0, 0, 0), (1, 1, 1), equalize=True)
    expected = Image.fromarray(np.asarray(ImageOps.equalize(Image.fromarray(grey))))
    assert np.array_equal(eq.resize_image(grey), np.asarray(expected.resize((16, 12), Image.Resampling.BILINEAR)))
    assert np.ptp(eq.resize_image(grey)) > 200 and Preprocess.from_dict(eq.to_dict()) == eq
    assert Preprocess.from_dict(old).equalize is False
    with pytest.raises(ValueError, match="not both"):
        Preprocess((8, 8), (0, 0, 0), (1, 1, 1), autocontrast=1.0, equalize=True)


def test_masks_are_binary_and_follow_their_image(tmp_path: Path) -> None:
    values = np.zeros((8, 8), np.uint8)
    values[0:4, 0:4] = 1  # faint labels count as defect
    values[4:8, 4:8] = 128
    Image.fromarray(values).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").sum() == 32
    pre = Preprocess((16, 16), (0, 0, 0), (1, 1, 1))
    mask = pre.mask(tmp_path / "m.png", (8, 8))
    assert mask.shape == (1, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[0, :8, :8].all() and mask[0, 8:, 8:].all() and not mask[0, :8, 8:].any()
    # a half-size mask of a 16 x 8 (W x H) image: resized to the image first, then to the input
    small = Preprocess((8, 16), (0, 0, 0), (1, 1, 1)).mask(tmp_path / "m.png", (16, 8))
    assert small.shape == (1, 8, 16) and small.sum() == 64
    assert pre.mask(None, (8, 8)).sum() == 0
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[0, 0] = (0, 0, 9)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert load_mask(tmp_path / "rgb.png").sum() == 1


# ---------------------------------------------------------------- dataset and augmentation


def test_dataset_items(tmp_path: Path) -> None:
    normal = Sample(str(_img(tmp_path / "n.png", value=(255, 255, 255))), 0, "good")
    with_mask = Sample(str(_img(tmp_path / "a.png")), 1, "crack", str(_mask(tmp_path / "a_mask.png")))
    without = Sample(str(_img(tmp_path / "b.png")), 1, "crack")
    cached = AnomalyDataset([normal, with_mask, without], PLAIN)
    assert cached.cache and len(cached) == 3
    items = [cached[i] for i in range(3)]
    assert [(i["label"], i["has_mask"], i["index"]) for i in items] == [(0, True, 0), (1, True, 1), (1, False, 2)]
    assert items[0]["image"].shape == (3, 16, 16) and items[0]["image"].dtype == torch.float32
    assert torch.allclose(items[0]["image"], torch.ones(3, 16, 16))
    assert items[0]["mask"].sum() == 0 and items[2]["mask"].sum() == 0
    assert items[1]["mask"].sum() == 64 and items[1]["path"] == with_mask.path  # 4x4 box at 2x scale
    uncached = AnomalyDataset([normal, with_mask, without], PLAIN, cache=False)
    for i in range(3):
        assert torch.equal(uncached[i]["image"], items[i]["image"])
        assert torch.equal(uncached[i]["mask"], items[i]["mask"])
    with pytest.raises(DatasetError, match="no samples"):
        AnomalyDataset([], PLAIN)


def test_decoded_images_read_each_file_once_per_preprocessing(tmp_path: Path, monkeypatch) -> None:
    """Datasets sharing a DecodedImages (several trainings on one set: auto.py's probes) decode each image once per
    preprocessing and serve exactly what a dataset of their own decodes; ``unread`` leaves out what was decoded;
    ``retain`` forgets the other preprocessings."""
    import fastflow.data.dataset as dataset_module

    samples = [Sample(str(_img(tmp_path / f"{i}.png", value=(40 * i, 90, 200))), 0, "good") for i in range(4)]
    samples.append(Sample(str(_img(tmp_path / "a.png")), 1, "crack", str(_mask(tmp_path / "a_mask.png"))))
    reads = []
    real_load = dataset_module.load_image
    monkeypatch.setattr(dataset_module, "load_image", lambda path: reads.append(path) or real_load(path))
    shared = dataset_module.DecodedImages()
    assert shared.unread(samples) == samples
    first = AnomalyDataset(samples[:3], PLAIN, decoded=shared)
    assert len(reads) == 3 and shared.unread(samples) == samples[3:]
    again = AnomalyDataset(samples, PLAIN, decoded=shared)  # three of them decoded before
    assert len(reads) == 5 and shared.unread(samples) == []
    stretched = Preprocess((16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), autocontrast=1.0)
    AnomalyDataset(samples[:2], stretched, decoded=shared)  # another preprocessing: decoded again
    assert len(reads) == 7
    own = AnomalyDataset(samples, PLAIN)
    for i in range(len(samples)):
        assert torch.equal(again[i]["image"], own[i]["image"]) and torch.equal(again[i]["mask"], own[i]["mask"])
    assert torch.equal(first[1]["image"], own[1]["image"])
    shared.retain(PLAIN)  # the stretched copies are forgotten, the plain ones kept
    AnomalyDataset(samples[:2], stretched, decoded=shared)
    AnomalyDataset(samples, PLAIN, decoded=shared)
    assert len(reads) == 9 + len(samples)  # (``own`` read them all once more)


def test_augmentation_moves_image_and_mask_together(tmp_path: Path) -> None:
    mask = np.zeros((32, 32), np.uint8)
    mask[3:12, 5:25] = 255  # asymmetric, so every flip and rotation changes it
    Image.fromarray(mask).convert("RGB").save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    dataset = AnomalyDataset([Sample(str(tmp_path / "a.png"), 1, "x", str(tmp_path / "a_mask.png"))],
                             Preprocess((32, 32), (0, 0, 0), (1, 1, 1)), augment=True)
    torch.manual_seed(0)
    changed = 0
    for _ in range(20):
        item = dataset[0]
        shown, label = item["image"][0] > 0.5, item["mask"][0] > 0.5
        assert (shown == label).float().mean() > 0.97  # bilinear vs nearest may differ on the edge only
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        changed += not torch.equal(label, torch.from_numpy(mask > 0))
    assert changed >= 10  # P(untouched) = 0.5 * 0.7 * 0.3 ~ 0.1 per draw
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    out_image, out_mask = augment_pair(image, torch.zeros(1, 8, 8, dtype=torch.bool))
    assert out_image.dtype == torch.uint8 and out_mask.dtype == torch.bool and type(out_image) is torch.Tensor


def test_pose_augmentation_stays_in_the_paper_ranges_and_moves_the_mask_along(tmp_path: Path) -> None:
    from fastflow.data.augment import POSE_DEGREES, TRANSLATE, ZOOM, random_pose
    gen = torch.Generator().manual_seed(0)
    poses = [random_pose((100, 200), gen) for _ in range(300)]
    assert all(ZOOM[0] <= p.scale <= ZOOM[1] and abs(p.angle) <= POSE_DEGREES for p in poses)
    assert all(abs(p.translate[0]) <= 30 and abs(p.translate[1]) <= 15 for p in poses)  # 15% of W=200, H=100
    assert max(p.angle for p in poses) > 10 and min(p.angle for p in poses) < -10  # the whole range is drawn
    assert TRANSLATE == 0.15
    image = np.full((32, 32, 3), 40, np.uint8)  # background 40, a bright asymmetric mark that is also the mask
    image[6:14, 8:26] = 250
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray((image[..., 0] > 100).astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    dataset = AnomalyDataset([Sample(str(tmp_path / "a.png"), 1, "x", str(tmp_path / "a_mask.png"))],
                             Preprocess((32, 32), (0, 0, 0), (1, 1, 1)), augment="pose")
    torch.manual_seed(0)
    for _ in range(10):
        item = dataset[0]
        shown, label = item["image"][0] > 0.6, item["mask"][0] > 0.5
        assert (shown == label).float().mean() > 0.95
        assert item["image"][0].min() > 0.1  # uncovered corners get the background colour (40), not black
    with pytest.raises(ValueError, match="augment must be one of"):
        AnomalyDataset([Sample(str(tmp_path / "a.png"), 0, "x")], PLAIN, augment="zoom")
