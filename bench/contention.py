"""A fair share of a busy CPU: ``fastflow demo`` alone and beside one busy process (issue 20, item 4).

    python bench/contention.py                      # demo alone, then beside a busy process; the slowdown
    python bench/contention.py --busy demo          # the busy process is a second `fastflow demo`
    python bench/contention.py --busy matmul        # ... a torch matmul loop with torch's default threads
    python bench/contention.py --busy yes           # ... one spinning core (`yes > /dev/null`)
    python bench/contention.py --busy yes --busy-after 20   # ... that starts 20 s into the demo
    python bench/contention.py --threads 1 --env OMP_WAIT_POLICY=ACTIVE   # a variant of the demo's settings
    python bench/contention.py --probe --seconds 20 # small A/B: one training step's time per variant

Goal (issue 20): beside one busy process the demo is at most 2.5x slower than alone. The first mode
prints and writes (``--output``, default bench/results/contention.json) the two wall times, their
ratio, and the settings the demo ran with (threads, OMP_WAIT_POLICY).

``--probe`` is the quick look used to choose the defaults: in a fresh child process per variant
(threads x OpenMP wait policy), the median time of one lite0 training step on the demo's shapes
(backbone on a batch of 8 images at 128 px, then the flows' forward + backward on the features),
alone and beside a busy loop; a few seconds per cell. Needs no data and no network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# -- the busy neighbour -------------------------------------------------------------------------------
BUSY_MATMUL = ("import torch\nx = torch.randn(512, 512)\nwhile True:\n    y = x @ x\n")


def start_busy(kind: str, workdir: str) -> subprocess.Popen:
    """One other CPU-heavy process: ``yes`` (one core), ``matmul`` (torch, all cores), ``demo``."""
    if kind == "yes":
        cmd = ["sh", "-c", "exec yes > /dev/null"]
    elif kind == "matmul":
        cmd = [sys.executable, "-c", BUSY_MATMUL]
    elif kind == "demo":  # a second demo that keeps running for as long as the measured one
        cmd = ["sh", "-c", f"while true; do {sys.executable} -m fastflow demo --output {workdir}/busy --quiet "
                           f"> /dev/null 2>&1; done"]
    else:
        raise ValueError(f"--busy must be yes, matmul or demo, got {kind!r}")
    # Its own session, so that stop_busy ends the loop and its children and nothing else.
    return subprocess.Popen(cmd, env=_env({}), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_busy(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this script created for it
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# -- the demo, alone and beside the busy process ------------------------------------------------------
def run_demo(workdir: str, epochs: int | None, threads: int | None, env: dict[str, str],
             late: tuple[str, float] | None = None) -> float:
    """The demo's wall time; ``late`` = (kind, seconds): a busy neighbour starts that long after the demo."""
    cmd = [sys.executable, "-m", "fastflow", "demo", "--output", os.path.join(workdir, "demo"), "--quiet"]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if threads:
        cmd += ["--threads", str(threads)]
    busy = None
    t0 = time.perf_counter()
    demo = subprocess.Popen(cmd, env=_env(env), stdout=subprocess.DEVNULL)
    try:
        if late is not None:
            try:
                demo.wait(timeout=late[1])
            except subprocess.TimeoutExpired:
                busy = start_busy(late[0], workdir)
        if demo.wait() != 0:
            raise subprocess.CalledProcessError(demo.returncode, cmd)
    finally:
        if busy is not None:
            stop_busy(busy)
        if demo.poll() is None:
            demo.kill()
    return time.perf_counter() - t0


def measure_demo(args) -> dict:
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for rep in range(args.repeats):
            load_alone = _load()
            alone = run_demo(workdir, args.epochs, args.threads, env)
            if args.busy_after is not None:  # the neighbour arrives while the demo runs
                load_busy = _load()
                beside = run_demo(workdir, args.epochs, args.threads, env, (args.busy, args.busy_after))
            else:
                busy = start_busy(args.busy, workdir)
                try:
                    time.sleep(2.0)  # let the neighbour reach its steady state
                    load_busy = _load()
                    beside = run_demo(workdir, args.epochs, args.threads, env)
                finally:
                    stop_busy(busy)
            rows.append({"alone_s": round(alone, 2), "beside_s": round(beside, 2), "slowdown": round(beside / alone, 2),
                         "load_before_alone": load_alone, "load_before_beside": load_busy})
            print(f"repeat {rep + 1}: alone {alone:.1f} s, beside `{args.busy}` {beside:.1f} s: "
                  f"{beside / alone:.2f}x (goal <= 2.5x)", flush=True)
    return {"mode": "demo", "busy": args.busy, "busy_after_s": args.busy_after, "epochs": args.epochs, "threads": args.threads or "default",
            "env": env or "default", "cpus": os.cpu_count(), "runs": rows,
            "slowdown_median": statistics.median(r["slowdown"] for r in rows)}


# -- the probe: one training step per variant, alone and beside a busy loop ----------------------------
def worker(seconds: float, threads: int) -> None:
    """One lite0 training step on the demo's shapes, repeated for ``seconds``; prints the median in ms."""
    import torch

    from fastflow.config import ModelConfig
    from fastflow.device import set_threads
    from fastflow.model import FastFlow

    set_threads(threads or None)  # 0: fastflow's default (device.default_threads)
    torch.manual_seed(0)
    model = FastFlow(ModelConfig(input_size=(128, 128)), weights="random")
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    images = torch.randn(8, 3, 128, 128)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        feats = model.extract(images)  # the backbone (the demo's feature cache and evaluation)
        out = model.forward_features(feats, with_map=False)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": 1000 * statistics.median(times[1:]), "steps": len(times),
                      "threads": torch.get_num_threads()}))


def _policy_env(policy: str) -> dict[str, str]:
    """A variant's OpenMP setting: ACTIVE / PASSIVE (``OMP_WAIT_POLICY``), SPIN<N> (``GOMP_SPINCOUNT=N``, how
    long libgomp's idle threads spin before they sleep, with no wait policy) or DEFAULT (neither)."""
    if policy.startswith("SPIN"):
        return {"GOMP_SPINCOUNT": policy[4:]}
    return {} if policy == "DEFAULT" else {"OMP_WAIT_POLICY": policy}


def probe(args) -> dict:
    # 0 threads: the CLI's count at start (the idle CPUs); the wait policy is the variant's
    variants = [(int(t), policy.upper()) for t, policy in (v.split(":") for v in args.variants.split(","))]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for threads, policy in variants:
            cell = {"threads": threads, "OMP_WAIT_POLICY": policy}
            for where in ("alone", "beside"):
                busy = start_busy(args.busy, workdir) if where == "beside" else None
                try:
                    if busy:
                        time.sleep(1.0)
                    load = _load()
                    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--seconds",
                                          str(args.seconds), "--threads", str(threads)],
                                         env=_env(_policy_env(policy)), check=True, capture_output=True,
                                         text=True)
                finally:
                    if busy:
                        stop_busy(busy)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                cell[f"{where}_ms"] = round(res["median_ms"], 1)
                cell[f"{where}_load"] = load
                cell[f"{where}_threads"] = res["threads"]
            cell["slowdown"] = round(cell["beside_ms"] / cell["alone_ms"], 2)
            rows.append(cell)
            print(f"threads {threads or 'default'} ({cell['alone_threads']}/{cell['beside_threads']}) {policy:<8} "
                  f"alone {cell['alone_ms']:7.1f} ms  beside `{args.busy}` {cell['beside_ms']:7.1f} ms  "
                  f"{cell['slowdown']:.2f}x   (load {cell['alone_load']} / {cell['beside_load']})", flush=True)
    return {"mode": "probe", "busy": args.busy, "seconds_per_cell": args.seconds, "cpus": os.cpu_count(),
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--busy", default="matmul", choices=["yes", "matmul", "demo"], help="the busy neighbour")
    p.add_argument("--busy-after", type=float, default=None, metavar="SECONDS",
                   help="start the neighbour this long after the demo (default: before it, already busy)")
    p.add_argument("--epochs", type=int, default=None, help="demo epochs (default: the demo's own)")
    p.add_argument("--threads", type=int, default=None, help="passed to `fastflow demo --threads`")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the demo")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--probe", action="store_true", help="the quick per-step A/B instead of the demo")
    p.add_argument("--seconds", type=float, default=20.0, help="--probe: seconds per cell")
    p.add_argument("--variants", default="2:ACTIVE,2:PASSIVE,1:ACTIVE,1:PASSIVE,0:PASSIVE",
                   help="--probe: THREADS:POLICY,... (POLICY: ACTIVE, PASSIVE, SPIN<N> or DEFAULT; 0 threads: "
                        "fastflow's default count)")
    p.add_argument("--output", default=None, help="JSON (default: bench/results/contention[_probe].json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the busy neighbour (finally)
    if args.worker:
        return worker(args.seconds, args.threads or 0)
    result = probe(args) if args.probe else measure_demo(args)
    result["uptime_load_after"] = _load()
    out = args.output or os.path.join(HERE, "results", "contention_probe.json" if args.probe else "contention.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
