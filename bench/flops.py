"""FLOPs of the efficientnet_lite0 preset's parts at batch 1 (torch.utils.flop_counter), and of flow variants.

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
    import timm

    torch.set_num_threads(2)
    out = {}
    base = C.lite0_model()
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        feats = base.extract(x)
        out["backbone_GFLOPs"] = round(gflops(lambda: base.extract(x)), 3)
        # timm's features_only network runs every block, the stride-32 stages included; ours stops
        # after the last level used (backbones.py). The "untruncated" figure is what we ran before.
        full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3)).eval()
        out["backbone_untruncated_GFLOPs"] = round(gflops(lambda: full(x)), 3)
        variants = {"preset": {}, "3-3_r1.0": {"kernels": "3-3", "hidden_ratio": 1.0},
                    "3-3_r0.5": {"kernels": "3-3", "hidden_ratio": 0.5},
                    "3-1_r1.0": {"kernels": "3-1", "hidden_ratio": 1.0}}
        for name, over in variants.items():
            m = C.lite0_model(backbone=base.backbone, **over)
            # Counted on the reference flow (m, not fused.for_inference(m)): the inference form runs its 3x3
            # convolutions as oneDNN ops that the flop counter does not see; the arithmetic is the same.
            with torch.inference_mode(False), torch.no_grad():
                plain = [f.clone() for f in feats]
                out[f"additional_{name}_GFLOPs"] = round(gflops(lambda: m.forward_features(plain, (256, 256))), 3)
            out[f"ratio_{name}"] = round(out[f"additional_{name}_GFLOPs"] / out["backbone_GFLOPs"], 3)
            out[f"ratio_{name}_vs_untruncated"] = round(
                out[f"additional_{name}_GFLOPs"] / out["backbone_untruncated_GFLOPs"], 3)
            out[f"trainable_params_{name}"] = m.parameter_counts()["trainable"]
    print(json.dumps(out, indent=1))
    C.write_json(C.RESULTS / "flops.json", out)


if __name__ == "__main__":
    main()
