"""FLOPs of the efficientnet_lite0 preset's parts at batch 1 (torch.utils.flop_counter), 3-3 vs 3-1 kernels.

    .venv/bin/python bench/flops.py

A load-independent view of the additional-time target (flows + map <= 0.5 x backbone): counts
the multiply-adds (FLOPs / 2) of the backbone and of normalisation + flows + anomaly map.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402


def gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def main() -> None:
    torch.set_num_threads(2)
    out = {}
    base = C.lite0_model()
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        feats = base.extract(x)
        out["backbone_GFLOPs"] = round(gflops(lambda: base.extract(x)), 3)
        for k in ("3-3", "3-1"):
            m = C.lite0_model(k, backbone=base.backbone)
            out[f"additional_{k}_GFLOPs"] = round(gflops(lambda: m.forward_features(feats, (256, 256))), 3)
            out[f"ratio_{k}"] = round(out[f"additional_{k}_GFLOPs"] / out["backbone_GFLOPs"], 3)
            out[f"trainable_params_{k}"] = m.parameter_counts()["trainable"]
    print(json.dumps(out, indent=1))
    C.write_json(C.RESULTS / "flops.json", out)


if __name__ == "__main__":
    main()
