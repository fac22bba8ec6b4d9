"""A long-lived anomalib FastFlow (lite0) process that times forwards on request, for interleaving.

Run with the peer venv; bench/side_by_side.py starts it and talks to it over stdin/stdout:

    bench/.venv-anomalib/bin/python bench/peer/peer_worker.py [--threads 2]

The model, images and timing loop are exactly those of bench/peer/anomalib_fastflow.py (imported
from it): ``build_torch_model``, ``example_images`` (bottle/test resized to 256) and
``time_forward`` (inference_mode, anomaly map materialised). Protocol, one JSON object a line:

    -> {"batch": 1, "runs": 10, "warmup": 0}
    <- {"times": [seconds, ...]}
    -> {"quit": true}

The first line the worker writes is {"ready": true, "model": {...}}. Everything else the
libraries print goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # The protocol owns the real stdout; library chatter goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr
    spec = importlib.util.spec_from_file_location("anomalib_fastflow_bench", HERE / "anomalib_fastflow.py")
    peer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = peer
    spec.loader.exec_module(peer)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = peer.build_torch_model(pretrained=True).eval()
    images = {}
    proto.write(json.dumps({"ready": True, "model": peer.describe(model), "threads": torch.get_num_threads(),
                            "torch": torch.__version__}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        b = int(req["batch"])
        if b not in images:
            images[b] = peer.example_images(b, peer.DEFAULT_DATA)
        times = peer.time_forward(model, images[b], int(req.get("warmup", 0)), int(req["runs"]))
        proto.write(json.dumps({"times": times}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
