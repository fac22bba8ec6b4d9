"""Load test of ``fastflow serve``: concurrent clients against a local server, beside ``predict``'s batch throughput.

    .venv/bin/python bench/serve_load.py --run RUN_DIR [--clients 16] [--duration 60] [--runtime torch|onnx]
        [--onnx MODEL.onnx] [--images ../shared/data/mvtec_ad/bottle/test] [--max-batch 16] [--batch-window-ms 10]
        [--limit-images N] [--predict-rounds 2] [--output bench/results/serve_load.json]

What runs: ``python -m fastflow serve RUN_DIR`` in a child process on a free port of 127.0.0.1 (the
real server, uvicorn and all). Once it answers, one warm-up request per client, then ``--clients``
threads, each with its own keep-alive connection, post one image after another (multipart, JSON
answer without pictures: what a line controller asks) for ``--duration`` seconds, cycling over the
images (bottle's test set by default, read into memory first). Reported: answered images per second,
latency p50 / p99 (ms, per request, client side), errors (any non-200 or broken connection: must be
0), the server's RSS at start (after the warm-up) and at the end, and the server's batch sizes.

Then, in the same run and after the server has stopped, ``predict``'s batch throughput on the same
images: ``Predictor.from_run(...).predict(paths, batch_size=--max-batch)`` (decode, preprocess, model,
maps at each image's size: the work the server does per image, minus HTTP). Goal (issue 20): the
server's throughput >= 70% of it. Prints one JSON object (also to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOTTLE_TEST = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body_for(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post(conn: http.client.HTTPConnection, body: bytes, ctype: str) -> int:
    conn.request("POST", "/predict", body, {"Content-Type": ctype})
    answer = conn.getresponse()
    answer.read()
    return answer.status


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (after the warm-up)")
    ap.add_argument("--runtime", choices=["torch", "onnx"], default="torch")
    ap.add_argument("--onnx", default=None)
    ap.add_argument("--images", default=str(BOTTLE_TEST), help="folder of images (recursive)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-window-ms", type=float, default=10.0)
    ap.add_argument("--limit-images", type=int, default=None, help="use only the first N images (quick checks)")
    ap.add_argument("--predict-rounds", type=int, default=2, help="timed passes of predict over the images")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    paths = paths[:args.limit_images] if args.limit_images else paths
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    bodies = [body_for(p.name, p.read_bytes()) for p in paths]

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fastflow", "serve", args.run, "--port", str(port), "--runtime", args.runtime,
           "--max-batch", str(args.max_batch), "--batch-window-ms", str(args.batch_window_ms)]
    if args.onnx:
        cmd += ["--onnx", args.onnx]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, proc)
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(args.clients)]
        warm = [threading.Thread(target=post, args=(c, *bodies[i % len(bodies)])) for i, c in enumerate(conns)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        for c in conns:  # fresh connections for the load: an idle one may have hit the server's keep-alive timeout
            c.close()
        conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=120) for _ in range(args.clients)]
        rss_start = rss_mib(proc.pid)
        health0 = json.loads(_get(port, "/health"))["batching"]

        latencies: list[float] = []
        errors = [0]
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.duration

        def client(k: int, conn: http.client.HTTPConnection) -> None:
            i = k
            while time.perf_counter() < stop_at:
                body, ctype = bodies[i % len(bodies)]
                i += args.clients
                t0 = time.perf_counter()
                try:
                    ok = post(conn, body, ctype) == 200
                except (OSError, http.client.HTTPException):
                    ok = False
                    conn.close()
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        latencies.append(dt)
                    else:
                        errors[0] += 1

        t_start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k, c)) for k, c in enumerate(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        rss_end = rss_mib(proc.pid)
        health1 = json.loads(_get(port, "/health"))["batching"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    batches = health1["batches"] - health0["batches"]
    served = health1["images"] - health0["images"]
    lat = sorted(latencies)
    server = {
        "clients": args.clients, "duration_s": round(wall, 2), "answered": len(lat), "errors": errors[0],
        "throughput_img_s": round(len(lat) / wall, 2),
        "latency_ms_p50": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "latency_ms_p99": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "rss_mib_start": round(rss_start, 1), "rss_mib_end": round(rss_end, 1),
        "mean_batch": round(served / batches, 2) if batches else None, "largest_batch": health1["largest_batch"],
        "max_batch": args.max_batch, "batch_window_ms": args.batch_window_ms,
    }

    sys.path.insert(0, str(REPO / "src"))
    from fastflow.predict import Predictor

    predictor = Predictor.from_run(args.run, runtime=args.runtime, onnx_path=args.onnx, batch_size=args.max_batch)
    predictor.predict([str(p) for p in paths[:args.max_batch]])  # warm-up
    rounds = []
    for _ in range(args.predict_rounds):
        t0 = time.perf_counter()
        predictor.predict([str(p) for p in paths])
        rounds.append(len(paths) / (time.perf_counter() - t0))
    batch_tp = statistics.median(rounds)
    result = {"run": os.path.abspath(args.run), "runtime": args.runtime, "images": len(paths), "server": server,
              "predict_batch_throughput_img_s": round(batch_tp, 2), "predict_batch_size": args.max_batch,
              "server_vs_predict": round(server["throughput_img_s"] / batch_tp, 3),
              "goals": {"errors_zero": errors[0] == 0, "at_least_70_percent": server["throughput_img_s"] >= 0.7 * batch_tp},
              "load_average": os.getloadavg()}
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    return conn.getresponse().read()


if __name__ == "__main__":
    main()
