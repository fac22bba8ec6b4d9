"""fastflow on one GPU: train -> evaluate -> predict -> export on bottle, and the paper's Table 1 in absolute numbers.

    python bench/gpu.py --data /path/to/mvtec_ad                       # cuda, lite0, fp32 and bf16, 10 epochs
    python bench/gpu.py --data ROOT --backbone wide_resnet50_2 --precisions fp32,bf16,fp16 --epochs 20
    python bench/gpu.py --data ROOT --device cpu --epochs 1 --limit 6  # check the script's logic on a CPU

For each precision: ``fastflow train`` (the CLI, in this process, ``--device --precision``), ``evaluate``
(image / pixel AUROC against fp32's: the accuracy cost of mixed precision), ``predict`` on the test set
(end to end: decoding, inference, PNG writing), and once ``export`` (ONNX, parity checked on the device).
Then Table 1 of the paper in absolute numbers, on the trained model, at batch 1 and batch 32 (median of
``--runs`` timed forwards after warm-up, synchronised):
    fps_b1               images per second of the whole model at batch 1 (1000 / ms)
    throughput_b32       images per second of the whole model at batch 32
    backbone_ms_b1       the frozen backbone alone
    additional_ms_b1     whole model - backbone: what the flows and the anomaly map add (the paper's
                         "additional inference time"), also at batch 32 per batch
    peak_memory_mb       torch.cuda.max_memory_allocated during training and during inference
and ONNX Runtime (CUDA provider when onnxruntime-gpu is installed) at batch 1 and 32.

Writes ``--output`` (default bench/results/gpu_<device>.json) and prints a Markdown table for the README.
Refuses, with one line and exit code 2, to run without a GPU unless ``--device cpu`` is given (a CPU run
only checks the script: its figures are not the GPU's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from fastflow.cli import main as cli  # noqa: E402
from fastflow.device import DeviceError, autocast, resolve_device  # noqa: E402


def _fail(message: str) -> None:
    print(f"bench/gpu.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # host: peak RSS of this process (KiB)


def subset(root: str, category: str, limit: int, workdir: str) -> str:
    """A copy of ``root/category`` (MVTec layout) made of links to at most ``limit`` images per folder."""
    src, dst = os.path.join(root, category), os.path.join(workdir, "subset", category)
    for folder, _, files in os.walk(src):
        images = sorted(f for f in files if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")))
        rel = os.path.relpath(folder, src)
        if not images:
            continue
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        keep = images[:limit]
        if rel.startswith("ground_truth"):  # the masks of the kept test images
            kept_tests = set(sorted(os.listdir(os.path.join(src, "test", os.path.basename(folder))))[:limit])
            keep = [f for f in images if f.replace("_mask", "") in kept_tests]
        for f in keep:
            os.symlink(os.path.join(folder, f), os.path.join(dst, rel, f))
    return os.path.dirname(dst)


def time_forward(fn, device: torch.device, runs: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``runs`` (after ``warmup``), synchronised on the device."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


@torch.inference_mode()
def table1(run_dir: str, device: torch.device, precision: str, runs: int) -> dict:
    """The paper's Table 1 figures of the trained model at ``run_dir``, on ``device`` at ``precision``."""
    from fastflow.evaluate import load_run

    model, _ = load_run(run_dir)
    model.to(device).eval()
    h, w = model.config.input_size
    out = {}
    _reset_peak(device)
    for batch in (1, 32):
        x = torch.randn(batch, 3, h, w, device=device)

        def whole():
            with autocast(device, precision):
                return model(x)

        def backbone():
            with autocast(device, precision):
                return model.extract(x)

        full_ms = time_forward(whole, device, runs if batch == 1 else max(3, runs // 4))
        back_ms = time_forward(backbone, device, runs if batch == 1 else max(3, runs // 4))
        key = f"b{batch}"
        out[f"whole_ms_{key}"] = round(full_ms, 3)
        out[f"backbone_ms_{key}"] = round(back_ms, 3)
        out[f"additional_ms_{key}"] = round(full_ms - back_ms, 3)
        if batch == 1:
            out["fps_b1"] = round(1000 / full_ms, 1)
        else:
            out["throughput_b32"] = round(1000 * batch / full_ms, 1)
    out["peak_memory_inference_mb"] = round(_peak_mb(device), 1)
    counts = model.parameter_counts()
    out["params_flow_m"] = round(counts["trainable"] / 1e6, 3)
    out["params_backbone_m"] = round(counts["backbone"] / 1e6, 3)
    return out


def onnx_timing(onnx_path: str, device: torch.device, runs: int) -> dict:
    """ONNX Runtime batch 1 latency and batch 32 throughput with the provider ``device`` gets."""
    import numpy as np
    import onnxruntime as ort

    from fastflow.export import INPUT_NAME, OUTPUT_NAMES
    from fastflow.predict import onnx_providers

    session = ort.InferenceSession(onnx_path, providers=onnx_providers(device))
    meta = json.load(open(os.path.splitext(onnx_path)[0] + ".json"))
    _, _, h, w = meta["inputs"][0]["shape"]
    res = {"provider": session.get_providers()[0]}
    for batch in (1, 32):
        x = np.random.default_rng(0).standard_normal((batch, 3, h, w), dtype=np.float32)
        ms = time_forward(lambda: session.run(list(OUTPUT_NAMES), {INPUT_NAME: x}), torch.device("cpu"),
                          runs if batch == 1 else max(3, runs // 4))
        res[f"ms_b{batch}"] = round(ms, 3)
    res["fps_b1"] = round(1000 / res["ms_b1"], 1)
    res["throughput_b32"] = round(32000 / res["ms_b32"], 1)
    return res


def run_precision(args, device: torch.device, precision: str, data: str, workdir: str) -> dict:
    run = os.path.join(workdir, f"run_{precision}")
    common = ["--device", str(device), "--precision", precision]
    row: dict = {"precision": precision}
    _reset_peak(device)
    t0 = time.perf_counter()
    threads = ["--threads", str(args.threads)] if args.threads else []
    rc = cli(["train", "--data", data, "--category", args.category, "--output", run, "--backbone", args.backbone,
              "--epochs", str(args.epochs), "--quiet", *common, *threads])
    if rc != 0:
        _fail(f"fastflow train exited with {rc} ({precision})")
    row["train_s"] = round(time.perf_counter() - t0, 2)
    row["peak_memory_train_mb"] = round(_peak_mb(device), 1)
    history = json.load(open(os.path.join(run, "history.json")))
    row["feature_cache_s"] = round(history["feature_cache_seconds"], 2)
    row["epoch_s_median"] = round(statistics.median(r["seconds"] for r in history["history"]), 3)

    metrics_path = os.path.join(workdir, f"metrics_{precision}.json")
    t0 = time.perf_counter()
    if cli(["evaluate", run, "--data", data, "--category", args.category, "--output", metrics_path, "--quiet",
            *common]) != 0:
        _fail(f"fastflow evaluate failed ({precision})")
    row["evaluate_s"] = round(time.perf_counter() - t0, 2)
    m = json.load(open(metrics_path))
    row.update({k: m.get(k) for k in ("image_auroc", "pixel_auroc", "pixel_aupro", "n_images")})

    test_dir = os.path.join(data, args.category, "test")
    t0 = time.perf_counter()
    if cli(["predict", run, test_dir, "--output", os.path.join(workdir, f"pred_{precision}"), "--batch-size", "32",
            "--quiet", *common]) != 0:
        _fail(f"fastflow predict failed ({precision})")
    seconds = time.perf_counter() - t0
    row["predict_end_to_end_img_s"] = round(m["n_images"] / seconds, 1)
    row.update(table1(run, device, precision, args.runs))
    row["run_dir"] = run
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data",
                                                  "mvtec_ad"), help="MVTec AD root")
    p.add_argument("--category", default="bottle")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--runs", type=int, default=50, help="timed forwards at batch 1 (batch 32: a quarter)")
    p.add_argument("--limit", type=int, default=None, help="at most N images per folder (a quick check)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None)
    args = p.parse_args()
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        _fail(f"{e} (this bench measures a GPU; --device cpu only checks the script)")
    if device.type != "cuda" and args.device.strip().lower() != "cpu":
        _fail(f"no GPU here ({args.device} resolved to {device}); this bench measures a CUDA GPU: run it on a "
              f"machine with one, or pass --device cpu to check the script only")
    precisions = [q.strip() for q in args.precisions.split(",") if q.strip()]
    if device.type == "cpu":
        precisions = [q for q in precisions if q != "fp16"]  # refused on the CPU (device.py)
    if not os.path.isdir(os.path.join(args.data, args.category)):
        _fail(f"{os.path.join(args.data, args.category)} not found: pass --data MVTEC_ROOT")
    env = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or platform.machine(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "backbone": args.backbone, "category": args.category, "epochs": args.epochs,
           "limit": args.limit, "threads": torch.get_num_threads()}
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        data = subset(args.data, args.category, args.limit, workdir) if args.limit else args.data
        for precision in precisions:
            print(f"[{precision}] train -> evaluate -> predict -> Table 1 on {device} ...", flush=True)
            rows.append(run_precision(args, device, precision, data, workdir))
        onnx_path = os.path.join(workdir, "model.onnx")
        t0 = time.perf_counter()
        if cli(["export", rows[0]["run_dir"], "--output", onnx_path, "--device", str(device)]) != 0:
            _fail("fastflow export failed")
        export = {"export_s": round(time.perf_counter() - t0, 2),
                  "parity": json.load(open(os.path.join(workdir, "model.json")))["parity"]}
        try:
            export.update(onnx_timing(onnx_path, device, args.runs))
        except ImportError as e:
            export["timing"] = f"skipped: {e}"
    base = rows[0]
    for r in rows:
        r.pop("run_dir")
        for k in ("image_auroc", "pixel_auroc"):
            if r.get(k) is not None and base.get(k) is not None:
                r[f"{k}_vs_{base['precision']}"] = round(r[k] - base[k], 4)
    result = {"env": env, "precisions": rows, "onnx": export}
    out = args.output or os.path.join(HERE, "results", f"gpu_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{env['device_name']} ({device}), {args.backbone}, {args.category}, {args.epochs} epochs"
          f"{'' if not args.limit else f', at most {args.limit} images per folder (a script check)'}")
    print("| precision | image AUROC | pixel AUROC | FPS b1 | img/s b32 | backbone ms b1 | additional ms b1 "
          "| additional ms b32 | peak MB train / infer | train s | predict img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['image_auroc']:.4f} | {r['pixel_auroc'] or float('nan'):.4f} | {r['fps_b1']} "
              f"| {r['throughput_b32']} | {r['backbone_ms_b1']} | {r['additional_ms_b1']} | {r['additional_ms_b32']} "
              f"| {r['peak_memory_train_mb']:.0f} / {r['peak_memory_inference_mb']:.0f} | {r['train_s']} "
              f"| {r['predict_end_to_end_img_s']} |")
    if "fps_b1" in export:
        print(f"ONNX Runtime ({export['provider']}): {export['fps_b1']} FPS at batch 1, {export['throughput_b32']} "
              f"img/s at batch 32; parity {export['parity']['max_rel_diff_map']:.1e}")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
