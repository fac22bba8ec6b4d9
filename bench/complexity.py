"""The paper's Table 1 for every preset: parameters, latency, throughput, additional time, memory.

    .venv/bin/python bench/complexity.py --output bench/results/complexity_cpu.json

For each preset (paper backbones with random weights: only speed and size are measured here):
  backbone / flow / normalisation parameters; end-to-end latency at batch 1 (median); throughput
  at batch B (images/s); the additional time (normalisation + flows + anomaly map, backbone
  excluded) per image at batch 1; peak resident memory of a fresh process running the preset.
Everything runs under ``torch.inference_mode()`` with ``torch.set_num_threads(--threads)``.
Writes JSON and prints a Markdown table (the README includes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402  (load accounting)


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def measure(preset_name: str, batch: int, reps: int, threads: int, device: str) -> dict:
    from fastflow.config import get_preset
    from fastflow.fused import for_inference
    from fastflow.model import FastFlow

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    preset = get_preset(preset_name)
    weights = "pretrained" if preset.model.backbone.startswith("efficientnet_lite") else "random"
    model = FastFlow(preset.model, weights=weights).eval().to(device)
    counts = model.parameter_counts()
    model = for_inference(model)  # what Predictor and evaluate run
    h, w = preset.model.input_size
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(x):
        def f():
            model(x)
            sync()
        return f

    with torch.inference_mode():
        x1 = torch.randn(1, 3, h, w, device=device)
        warm = max(2, min(10, reps // 2))  # lazily built state (blur operator, oneDNN primitives) and caches
        latency = _median_ms(run(x1), reps, warm)
        feats = model.extract(x1)

        def flows_only():
            model.forward_features(feats, (h, w))
            sync()

        additional = _median_ms(flows_only, reps, warm)
        backbone = _median_ms(lambda: (model.extract(x1), sync()), reps, warm)
        xb = torch.randn(batch, 3, h, w, device=device)
        t_b = _median_ms(run(xb), max(2, reps // 5), warmup=1)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "preset": preset_name, "backbone": preset.model.backbone, "input_size": [h, w], "weights": weights,
        "params_backbone_M": counts["backbone"] / 1e6, "params_flow_M": counts["flow"] / 1e6,
        "params_norm_M": counts["norm"] / 1e6, "latency_b1_ms": latency, "backbone_b1_ms": backbone,
        "additional_b1_ms": additional, "additional_over_backbone": additional / backbone,
        f"throughput_b{batch}_ips": 1000 * batch / t_b, "batch": batch, "fps_b1": 1000 / latency,
        "peak_memory_MiB": peak, "device": device, "threads": threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="efficientnet_lite0,resnet18,wide_resnet50_2,deit,cait")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--output", default=None)
    ap.add_argument("--override", action="append", default=[], metavar="PRESET:reps=N,batch=M",
                    help="per-preset reps/batch (e.g. cait:reps=3,batch=4: CaiT-M48 at 448 is slow on CPU)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one preset
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.reps, args.threads, args.device)))
        return
    overrides = {}
    for o in args.override:
        name, _, kv = o.partition(":")
        overrides[name] = {k: int(v) for k, v in (item.split("=") for item in kv.split(",") if item)}
    rows = []
    for name in args.presets.split(","):
        # One fresh process per preset so that peak memory is that preset's own.
        ov = overrides.get(name, {})
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(ov.get("batch", args.batch)),
               "--reps", str(ov.get("reps", args.reps)), "--threads", str(args.threads), "--device", args.device]
        with C.Load() as load:
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["reps"] = ov.get("reps", args.reps)
        row["load"] = load.summary()  # others' CPU seconds while this preset was measured
        rows.append(row)
        print(f"measured {name}: {row['load']}", file=sys.stderr)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "threads": args.threads, "overrides": overrides, "rows": rows}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| preset | input | backbone params (M) | flow params (M) | norm params (M) | latency b1 (ms) | FPS b1 "
             "| throughput (img/s) @ batch | additional time b1 (ms) | additional / backbone | peak RSS (MiB) "
             "| reps | others' CPU share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        batch = r["batch"]
        share = r.get("load", {}).get("others_share")
        lines.append(
            f"| {r['preset']} | {r['input_size'][0]} | {r['params_backbone_M']:.1f} | {r['params_flow_M']:.2f} | "
            f"{r['params_norm_M']:.2f} | {r['latency_b1_ms']:.1f} | {r['fps_b1']:.3g} | "
            f"{r[f'throughput_b{batch}_ips']:.3g} @ {batch} | {r['additional_b1_ms']:.1f} | "
            f"{r['additional_over_backbone']:.2f} | {r['peak_memory_MiB']:.0f} | {r.get('reps', '')} | "
            f"{'' if share is None else f'{share:.2f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
