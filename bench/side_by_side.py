"""Ours (torch and ONNX Runtime) vs anomalib's FastFlow, efficientnet_lite0 at 256x256, CPU, one run.

    .venv/bin/python bench/side_by_side.py [--threads 2] [--blocks 3] [--runs-b1 30] [--runs-b32 5]

What runs, in one process (ours) plus one long-lived peer process (bench/peer/peer_worker.py in
bench/.venv-anomalib, anomalib 2.7.0's FastflowModel on tf_efficientnet_lite0, the same model,
images and timing loop as bench/peer/anomalib_fastflow.py):

* latency at batch 1: ``--runs-b1`` forwards of each of {ours torch, ours ONNX Runtime, peer},
  interleaved in ``--blocks`` blocks (torch x n, ORT x n, peer x n, then again) so that changing load
  from other jobs on the machine hits all three alike; median per contender.
* throughput at batch 32: ``--runs-b32`` rounds of one batch-32 forward each; 32 / median.
* additional time (normalisation + flows + anomaly map; backbone excluded) vs backbone time at
  batch 1 (median of ``--runs-b1``) and batch 32, for the preset (3-1 kernels) and, for comparison, 3-3.
* the torch path at batch 32 once more with the backbone's CPU micro-batching off
  (``ours_torch_whole_batch``: the whole batch in one backbone forward), for the A/B of that change.
* then, unless ``--no-peer-script``, bench/peer/anomalib_fastflow.py --train-epochs 0 as documented
  (its own JSON, a standalone cross-check of the worker's numbers).

Ours: the efficientnet_lite0 preset (pretrained backbone, freshly initialised flows: speed does not
depend on flow weights), ``torch.inference_mode()``, ``torch.set_num_threads(threads)``; the ONNX path
is fastflow.export's exporter (torchscript, opset 18, parity-checked) in ONNX Runtime with
intra_op_num_threads = threads, no spinning. Inputs: real bottle test images resized to 256x256.
Every block records the CPU seconds other processes used and the load average.
Writes bench/results/side_by_side.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from fastflow.fused import for_inference  # noqa: E402

TARGET_SPEEDUP = 2.0
TARGET_ADDITIONAL = 0.5


def interleaved(contenders: dict, runs: int, blocks: int, peer: C.PeerWorker | None, peer_name: str,
                peer_batch: int) -> tuple[dict, list]:
    """Times of each contender, in ``blocks`` rotating blocks; the peer is timed through its worker."""
    times = {name: [] for name in contenders}
    if peer is not None:
        times[peer_name] = []
    loads = []
    per = [runs // blocks + (1 if b < runs % blocks else 0) for b in range(blocks)]
    for b, n in enumerate(per):
        with C.Load() as load:
            p0 = peer.cpu_s() if peer else 0.0
            for name, fn in contenders.items():
                times[name] += C.time_calls(fn, n)
            if peer is not None:
                times[peer_name] += peer.time(peer_batch, n)
            p1 = peer.cpu_s() if peer else 0.0
        loads.append({"block": b, "runs": n, **load.summary(known_child_cpu_s=p1 - p0)})
    return times, loads


def whole_batch(model, fn):
    """``fn`` with the backbone's CPU micro-batching off (the whole batch in one forward), for the A/B."""
    def run():
        saved, model.backbone.cpu_micro_batch = model.backbone.cpu_micro_batch, 0
        try:
            return fn()
        finally:
            model.backbone.cpu_micro_batch = saved
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-b1", type=int, default=30)
    ap.add_argument("--runs-b32", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-peer-script", action="store_true")
    ap.add_argument("--output", default=str(C.RESULTS / "side_by_side.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"env": C.environment(args.threads), "other_processes_at_start": C.other_processes(),
              "load_avg_start": [round(v, 2) for v in os.getloadavg()]}
    model = C.lite0_model()
    model33 = C.lite0_model("3-3", backbone=model.backbone)  # the preset is 3-1; 3-3 for comparison
    fast, fast33 = for_inference(model), for_inference(model33)  # what Predictor and evaluate run
    session, onnx_info = C.onnx_session(model, args.threads)
    result["onnx"] = onnx_info
    result["ours_params"] = model.parameter_counts()
    print(f"exported ONNX in {onnx_info['export_s']} s; starting the peer", file=sys.stderr)
    peer = C.PeerWorker(args.threads)
    result["peer_model"] = peer.info
    try:
        x1, xb = C.bottle_batch(model, 1), C.bottle_batch(model, args.batch)
        b1 = {"ours_torch": C.torch_runner(model, x1), "ours_onnx": C.ort_runner(session, x1)}
        bb = {"ours_torch": C.torch_runner(model, xb), "ours_onnx": C.ort_runner(session, xb),
              "ours_torch_whole_batch": whole_batch(model, C.torch_runner(model, xb))}
        # Warm-up: the batch-32 forwards first, then batch 1, so the timed batch-1 block does not start
        # right after the large allocations (in the 11:21 run the first batch-1 block of both our
        # runtimes was ~1.5x slower than the next two).
        for fn in bb.values():
            C.time_calls(fn, 1)
        peer.time(args.batch, 1)
        for fn in b1.values():
            C.time_calls(fn, 10)
        peer.time(1, 10)

        print("batch 1 ...", file=sys.stderr)
        t1, load1 = interleaved(b1, args.runs_b1, args.blocks, peer, "anomalib", 1)
        print(f"batch {args.batch} ...", file=sys.stderr)
        tb, loadb = interleaved(bb, args.runs_b32, args.runs_b32, peer, "anomalib", args.batch)
    finally:
        peer.close()

    # Additional time vs backbone (ours only): extract / flows(3-3) / flows(3-1, the preset), interleaved.
    print("additional time ...", file=sys.stderr)
    with torch.inference_mode():
        feats = model.extract(x1)
        size = tuple(x1.shape[-2:])
        parts = {"backbone": lambda: model.extract(x1),
                 "additional_3-3": lambda: fast33.forward_features(feats, size),
                 "additional_3-1": lambda: fast.forward_features(feats, size)}
        for fn in parts.values():
            C.time_calls(fn, 3)
        tp, loadp = interleaved(parts, args.runs_b1, args.blocks, None, "", 1)
        featsb = model.extract(xb)
        parts_b = {"backbone": lambda: model.extract(xb),
                   "backbone_whole_batch": whole_batch(model, lambda: model.extract(xb)),
                   "additional_3-3": lambda: fast33.forward_features(featsb, size),
                   "additional_3-1": lambda: fast.forward_features(featsb, size)}
        tpb, loadpb = interleaved(parts_b, 3, 3, None, "", 1)

    lat = {k: C.med_ms(v) for k, v in t1.items()}
    thr = {k: C.ips(v, args.batch) for k, v in tb.items()}
    result["latency_b1_ms"] = lat
    result["latency_b1_ms_min"] = {k: round(1000 * min(v), 2) for k, v in t1.items()}
    result[f"throughput_b{args.batch}_ips"] = thr
    result["times_s"] = {"b1": t1, f"b{args.batch}": tb}
    result["load"] = {"b1_blocks": load1, f"b{args.batch}_rounds": loadb, "additional_blocks": loadp}
    # Ratios per block too: each block's three contenders ran back to back under the same load.
    per = [args.runs_b1 // args.blocks + (1 if b < args.runs_b1 % args.blocks else 0) for b in range(args.blocks)]
    starts = [sum(per[:b]) for b in range(args.blocks)]
    block_ratios = {k: [round(statistics.median(t1["anomalib"][s:s + n]) / statistics.median(t1[k][s:s + n]), 2)
                        for s, n in zip(starts, per)] for k in b1}
    round_ratios = {k: [round(p / o, 2) for p, o in zip(tb["anomalib"], tb[k])] for k in bb}
    speed = {}
    for k in b1:
        speed[k] = {"latency_b1_speedup": round(lat["anomalib"] / lat[k], 2),
                    "latency_b1_speedup_per_block": block_ratios[k],
                    f"throughput_b{args.batch}_speedup": round(thr[k] / thr["anomalib"], 2),
                    f"throughput_b{args.batch}_speedup_per_round": round_ratios[k]}
        speed[k]["meets_target"] = (speed[k]["latency_b1_speedup"] >= TARGET_SPEEDUP
                                    and speed[k][f"throughput_b{args.batch}_speedup"] >= TARGET_SPEEDUP)
    result["speedup_vs_anomalib"] = speed
    add = {}
    for name, tt in (("b1", tp), (f"b{args.batch}", tpb)):
        bk = statistics.median(tt["backbone"])
        add[name] = {"backbone_ms": round(1000 * bk, 2)}
        if "backbone_whole_batch" in tt:
            add[name]["backbone_whole_batch_ms"] = round(1000 * statistics.median(tt["backbone_whole_batch"]), 2)
        for k in ("3-3", "3-1"):
            a = statistics.median(tt[f"additional_{k}"])
            add[name][f"additional_{k}_ms"] = round(1000 * a, 2)
            add[name][f"ratio_{k}"] = round(a / bk, 3)
            add[name][f"meets_target_{k}"] = a / bk <= TARGET_ADDITIONAL
    result["additional_time"] = add
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]

    if not args.no_peer_script:
        print("peer script (standalone cross-check) ...", file=sys.stderr)
        result["peer_script"] = C.run_peer_script("--train-epochs", "0", "--wait-idle", "0", "--threads",
                                                  str(args.threads), "--runs-b32", str(args.runs_b32))
    C.write_json(args.output, result)
    print(markdown(result, args.batch))


def markdown(r: dict, batch: int) -> str:
    lat, thr, sp = r["latency_b1_ms"], r[f"throughput_b{batch}_ips"], r["speedup_vs_anomalib"]
    shares = [b["others_share"] for b in r["load"]["b1_blocks"] + r["load"][f"b{batch}_rounds"]]
    lines = [f"| contender | latency b1 (ms, median) | vs anomalib | throughput b{batch} (img/s) | vs anomalib "
             f"| target (both >= {TARGET_SPEEDUP:g}x) |", "|---|---|---|---|---|---|"]
    for k in ("ours_torch", "ours_onnx"):
        s = sp[k]
        lines.append(f"| {k.replace('_', ' ')} | {lat[k]:.1f} | {s['latency_b1_speedup']:.2f}x | {thr[k]:.1f} | "
                     f"{s[f'throughput_b{batch}_speedup']:.2f}x | {'met' if s['meets_target'] else 'missed'} |")
    if "ours_torch_whole_batch" in thr:
        w = thr["ours_torch_whole_batch"]
        lines.append(f"| ours torch, backbone not micro-batched | | | {w:.1f} | {w / thr['anomalib']:.2f}x | |")
    lines.append(f"| anomalib 2.7.0 | {lat['anomalib']:.1f} | 1 | {thr['anomalib']:.1f} | 1 | |")
    if "peer_script" in r:
        ps = r["peer_script"]
        lines.append(f"| anomalib (its script, right after) | {ps['latency_b1_ms']:.1f} | | "
                     f"{ps['throughput_b32_ips']:.1f} | | contended: {ps.get('contended')} |")
    lines.append("")
    lines.append(f"Others' share of the 2 cores while timing: {min(shares):.2f}-{max(shares):.2f} "
                 f"(load avg {r['load_avg_start']} -> {r['load_avg_end']}).")
    lines.append("")
    lines.append(f"| additional time (norm + flows + map) | backbone (ms) | 3-3 (ms) | 3-3 / backbone | 3-1 (ms) "
                 f"| 3-1 / backbone | target <= {TARGET_ADDITIONAL} |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, a in r["additional_time"].items():
        lines.append(f"| {name} | {a['backbone_ms']:.1f} | {a['additional_3-3_ms']:.1f} | {a['ratio_3-3']:.2f} | "
                     f"{a['additional_3-1_ms']:.1f} | {a['ratio_3-1']:.2f} | 3-3 "
                     f"{'met' if a['meets_target_3-3'] else 'missed'}, 3-1 "
                     f"{'met' if a['meets_target_3-1'] else 'missed'} |")
        if "backbone_whole_batch_ms" in a:
            lines.append(f"| {name}, backbone not micro-batched | {a['backbone_whole_batch_ms']:.1f} | | "
                         f"{a['additional_3-3_ms'] / a['backbone_whole_batch_ms']:.2f} | | "
                         f"{a['additional_3-1_ms'] / a['backbone_whole_batch_ms']:.2f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
