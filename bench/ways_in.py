"""What each inference speed-up buys: efficientnet_lite0 preset, 256x256, CPU, interleaved blocks.

    .venv/bin/python bench/ways_in.py [--runs-b1 24] [--runs-b32 4] [--blocks 3] [--no-compile]

Variants (the same model and real bottle test images; speed does not depend on flow weights):
  baseline        torch.inference_mode(), 2 threads, NCHW (what Predictor does)
  no_grad         torch.no_grad() instead of inference_mode
  channels_last   model and input in channels_last memory format
  threads_1       torch.set_num_threads(1)
  omp_passive     baseline in a child process started with OMP_WAIT_POLICY=PASSIVE
  compile         torch.compile(model) (inductor; compile time reported separately)
  onnx            ONNX Runtime, intra_op 2 threads, no spinning (fastflow.export's graph)
  onnx_spin       the same with spinning allowed (ORT's default)
Each variant runs n forwards per block, blocks rotate over the variants, so load from other jobs
hits them alike; per-block others' CPU share and load average are recorded. Also a micro-bench
of the flow's channel permutation: index gather (what flow.py does) vs the 1x1 convolution with a
permutation matrix (what FrEIA's AllInOneBlock does), on the preset's feature shapes, 8 steps.
Writes bench/results/ways_in.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


class OursWorker:
    """This script in a child process (``--worker``) with a different environment: times on request."""

    def __init__(self, env: dict, threads: int):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", "--threads",
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env={**os.environ, **env})
        assert json.loads(self.proc.stdout.readline())["ready"]

    def time(self, batch: int, runs: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"batch": batch, "runs": runs}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def worker(threads: int) -> None:
    torch.set_num_threads(threads)
    model = C.lite0_model()
    xs = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        b = req["batch"]
        if b not in xs:
            xs[b] = C.bottle_batch(model, b)
            C.time_calls(C.torch_runner(model, xs[b]), 2 if b == 1 else 1)
        print(json.dumps({"times": C.time_calls(C.torch_runner(model, xs[b]), req["runs"])}), flush=True)


def permutation_bench(model, batch: int, reps: int) -> dict:
    """Gather vs 1x1-conv permutation on the preset's feature maps, x flow_steps, per forward."""
    steps = model.config.flow_steps
    out = {}
    with torch.inference_mode():
        for (c, h, w) in model.feature_shapes:
            z = torch.randn(batch, c, h, w)
            perm = torch.randperm(c)
            w_perm = torch.zeros(c, c, 1, 1)
            w_perm[torch.arange(c), perm] = 1.0
            assert torch.equal(z[:, perm], F.conv2d(z, w_perm))
            fns = {"gather": lambda: z[:, perm], "conv1x1": lambda: F.conv2d(z, w_perm)}
            t = {k: [] for k in fns}
            for _ in range(reps):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    t[k].append(time.perf_counter() - t0)
            out[f"{c}x{h}x{w}"] = {k: round(1000 * statistics.median(v), 3) for k, v in t.items()}
    out["total_ms"] = {k: round(sum(v[k] for v in out.values()), 3) for k in ("gather", "conv1x1")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-b1", type=int, default=24)
    ap.add_argument("--runs-b32", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(C.RESULTS / "ways_in.json"))
    args = ap.parse_args()
    if args.worker:
        worker(args.threads)
        return

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = {"env": C.environment(args.threads), "other_processes_at_start": C.other_processes(),
              "load_avg_start": [round(v, 2) for v in os.getloadavg()]}
    model = C.lite0_model()
    model_cl = C.lite0_model(backbone=None).to(memory_format=torch.channels_last)
    model_cl.load_state_dict(model.state_dict())
    session, info = C.onnx_session(model, args.threads, spinning=False)
    session_spin, _ = C.onnx_session(model, args.threads, spinning=True)
    result["onnx"] = info
    passive = OursWorker({"OMP_WAIT_POLICY": "PASSIVE"}, args.threads)
    compiled = None
    if not args.no_compile:
        t0 = time.perf_counter()
        try:
            compiled = torch.compile(model)
            with torch.inference_mode():
                compiled(C.bottle_batch(model, 1))
            result["compile_s_b1"] = round(time.perf_counter() - t0, 1)
        except Exception as e:  # noqa: BLE001 - report, do not fail the bench
            result["compile_error"] = f"{type(e).__name__}: {e}"[:500]
            compiled = None

    def no_grad_runner(m, x):
        def run():
            with torch.no_grad():
                return float(m(x).score[0])
        return run

    def with_threads(n, fn):
        def run():
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(args.threads)
        return run

    out = {}
    try:
        for batch, runs in ((1, args.runs_b1), (args.batch, args.runs_b32)):
            x = C.bottle_batch(model, batch)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            variants = {
                "baseline": C.torch_runner(model, x),
                "no_grad": no_grad_runner(model, x),
                "channels_last": C.torch_runner(model_cl, x_cl),
                "threads_1": with_threads(1, C.torch_runner(model, x)),
                "omp_passive": None,  # the worker
                "onnx": C.ort_runner(session, x),
                "onnx_spin": C.ort_runner(session_spin, x),
            }
            if compiled is not None:
                t0 = time.perf_counter()
                C.time_calls(C.torch_runner(compiled, x), 1)  # compiles for this batch size
                result[f"compile_first_call_s_b{batch}"] = round(time.perf_counter() - t0, 1)
                variants["compile"] = C.torch_runner(compiled, x)
            for name, fn in variants.items():
                if fn is None:
                    passive.time(batch, 2 if batch == 1 else 1)
                else:
                    C.time_calls(fn, 2 if batch == 1 else 1)
            times = {k: [] for k in variants}
            loads = []
            per = [runs // args.blocks + (1 if b < runs % args.blocks else 0) for b in range(args.blocks)]
            for b, n in enumerate(per):
                if n == 0:
                    continue
                print(f"batch {batch} block {b + 1}/{args.blocks}", file=sys.stderr, flush=True)
                order = list(variants)
                order = order[b % len(order):] + order[:b % len(order)]  # rotate who goes first
                with C.Load() as load:
                    c0 = passive.cpu_s()
                    for name in order:
                        fn = variants[name]
                        times[name] += passive.time(batch, n) if fn is None else C.time_calls(fn, n)
                    c1 = passive.cpu_s()
                loads.append(load.summary(known_child_cpu_s=c1 - c0))
            base = statistics.median(times["baseline"])
            out[f"b{batch}"] = {
                k: {"median_ms": C.med_ms(v), "images_per_s": C.ips(v, batch),
                    "speedup_vs_baseline": round(base / statistics.median(v), 2), "runs": len(v)}
                for k, v in times.items()}
            out[f"b{batch}"]["_load"] = loads
    finally:
        passive.close()
    result["variants"] = out
    print("permutation micro-bench ...", file=sys.stderr, flush=True)
    result["permutation"] = {"b1": permutation_bench(model, 1, 50), f"b{args.batch}": permutation_bench(model, args.batch, 5)}
    result["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    C.write_json(args.output, result)
    print(markdown(result, args.batch))


def markdown(r: dict, batch: int) -> str:
    v1, vb = r["variants"]["b1"], r["variants"][f"b{batch}"]
    lines = [f"| variant | latency b1 (ms) | vs baseline | throughput b{batch} (img/s) | vs baseline |",
             "|---|---|---|---|---|"]
    for k in v1:
        if k.startswith("_"):
            continue
        lines.append(f"| {k} | {v1[k]['median_ms']:.1f} | {v1[k]['speedup_vs_baseline']:.2f}x | "
                     f"{vb[k]['images_per_s']:.1f} | {vb[k]['speedup_vs_baseline']:.2f}x |")
    shares = [x["others_share"] for x in v1["_load"] + vb["_load"]]
    lines.append("")
    lines.append(f"Others' CPU share per block {min(shares):.2f}-{max(shares):.2f}; load average "
                 f"{r['load_avg_start']} -> {r['load_avg_end']}.")
    if "compile_s_b1" in r:
        lines.append(f"torch.compile: first call {r['compile_s_b1']} s at batch 1, "
                     f"{r.get(f'compile_first_call_s_b{batch}')} s more at batch {batch}.")
    elif "compile_error" in r:
        lines.append(f"torch.compile failed: {r['compile_error']}")
    p = r["permutation"]
    lines.append(f"Permutation, 8 steps x 3 levels: gather {p['b1']['total_ms']['gather']:.3f} ms vs 1x1 conv "
                 f"{p['b1']['total_ms']['conv1x1']:.3f} ms at batch 1; {p[f'b{batch}']['total_ms']['gather']:.1f} vs "
                 f"{p[f'b{batch}']['total_ms']['conv1x1']:.1f} ms at batch {batch}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
