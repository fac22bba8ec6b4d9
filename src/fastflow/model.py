"""The FastFlow model: frozen backbone -> per-level normalisation -> per-level 2D flow -> anomaly map.

    images (B, 3, H, W), normalised as the backbone expects
      -> backbone features: list of (B, C_i, H_i, W_i)
      -> per level: LayerNorm over (C_i, H_i, W_i) (CNNs; ViTs use their own final norm), Flow2D
      -> z_i (B, C_i, H_i, W_i), log|det| map_i (B, H_i, W_i)
      -> anomaly map (B, 1, H, W): per-level map, bilinearly upsampled, averaged over levels
      -> image score (B,): max of the map
    With per-level roles (``ModelConfig.map_levels`` / ``score_levels``) the map averages only the map levels
    (weighted by ``map_weights``, when the map choice set them) and the score is the max of the score levels' own
    map; every level's flow is trained all the same. The map choice may also set ``border_offsets``: subtracted
    from the map at each distance from the image border (``border_matrix``).

Two anomaly maps (``ModelConfig.anomaly_map``):
  * ``reference`` — what anomalib / gathierry compute: ``-exp(-0.5 * mean_C z^2)``; ignores log|det|.
  * ``loglik`` — the true negative log-likelihood per location, in nats per channel:
    ``(0.5 * sum_C z^2 + C/2 * log(2 pi) - log|det|) / C``. This is the paper's Eq. 2 per location.

Example:
    >>> model = FastFlow(ModelConfig(backbone="resnet18"), weights="random")
    >>> out = model(torch.randn(2, 3, 256, 256))
    >>> out.anomaly_map.shape, out.score.shape
    (torch.Size([2, 1, 256, 256]), torch.Size([2]))
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FeatureExtractor, build_backbone
from .config import ModelConfig, replace
from .flow import Flow2D

LOG_2PI = math.log(2 * math.pi)


@dataclass
class FastFlowOutput:
    """What ``FastFlow.forward`` returns, in every mode.

    z: per level (B, C_i, H_i, W_i); log_det_maps: per level (B, H_i, W_i);
    loss: scalar, mean over the batch of the per-image negative log-likelihood (nats, constant dropped);
    nll_per_dim: scalar, the same in nats per feature dimension (constant included) — readable;
    level_nll: (L,), each level's share of ``nll_per_dim`` (its flow's NLL over all the feature dimensions;
    they sum to it): the flows are independent, so training keeps each one's own best epoch (train.py);
    anomaly_map: (B, 1, H, W) at input resolution; score: (B,); both None from
    ``forward_features(..., with_map=False)``.
    """

    z: list[torch.Tensor]
    log_det_maps: list[torch.Tensor]
    loss: torch.Tensor
    nll_per_dim: torch.Tensor
    anomaly_map: torch.Tensor | None
    score: torch.Tensor | None
    level_nll: torch.Tensor | None = None


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) with reflect padding (truncated at 4 sigma).

    Computed as ``M_H @ x @ M_W^T`` with the blur's (H, H) and (W, W) operator matrices (``blur_matrix``):
    the same numbers as the padded convolution to float rounding, and on the CPU faster than ``conv2d``
    with a one-channel many-tap kernel (measured: bench/README.md, R7)."""
    h, w = int(x.shape[2]), int(x.shape[3])  # a constant of the graph when traced (exports are fixed-size)
    mh = _as_tensor(blur_matrix(h, float(sigma)), x)
    mw = mh if w == h else _as_tensor(blur_matrix(w, float(sigma)), x)
    return torch.matmul(torch.matmul(mh, x), mw.t())


def _as_tensor(m: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A cached NumPy operator as a tensor of ``like``'s dtype and device (a constant of a traced graph)."""
    return torch.tensor(m, dtype=like.dtype, device=like.device)


def _frozen(m: torch.Tensor) -> np.ndarray:
    out = m.numpy()
    out.setflags(write=False)  # cached and shared: nobody may change it in place
    return out


# The operators below are cached as read-only float64 NumPy arrays (small: n x n), never as tensors, so no
# device memory is held for the life of the process; each call converts to the input's dtype and device.
@functools.lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float64 matrix M with ``M @ v`` = v blurred along its length: reflect padding by
    ``min(4 sigma, n - 1)``, then a Gaussian kernel truncated to the padding and renormalised. Built by
    applying exactly that padded convolution to the identity, so it equals the definition by construction."""
    radius = max(1, int(4 * sigma + 0.5))
    pad = min(radius, n - 1)
    k = torch.exp(-0.5 * (torch.arange(-pad, pad + 1, dtype=torch.float64) / sigma) ** 2)
    eye = torch.eye(n, dtype=torch.float64).unsqueeze(1)  # n signals e_j of length n: (n, 1, n)
    with torch.no_grad():
        blurred = F.conv1d(F.pad(eye, (pad, pad), mode="reflect"), (k / k.sum()).view(1, 1, -1))
    return _frozen(blurred[:, 0].t())  # column j = blur(e_j)


@functools.lru_cache(maxsize=64)
def upsample_blur_matrix(n_in: int, n_out: int, sigma: float) -> np.ndarray:
    """(n_out, n_in) float64 matrix: linear upsampling from n_in to n_out as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does it along one axis (built by applying it to the identity), then the blur of
    ``blur_matrix`` (sigma 0: none)."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # (n_in, 1, n_in)
    with torch.no_grad():
        up = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0].t()  # (n_out, n_in)
    m = up.numpy()
    if sigma > 0:
        m = blur_matrix(n_out, sigma) @ m
    return _frozen(torch.from_numpy(np.ascontiguousarray(m)))


@functools.lru_cache(maxsize=64)
def _right_matrix(levels: tuple[tuple[int, float], ...], n_out: int, sigma: float) -> np.ndarray:
    """The column operators of all levels stacked, each scaled by its level's weight: (sum_l w_l, n_out)."""
    return _frozen(torch.from_numpy(np.concatenate(
        [upsample_blur_matrix(w, n_out, sigma).T * weight for w, weight in levels])))


def border_distance(size: tuple[int, int], input_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) int: each pixel's distance from the nearest image border, in pixels of ``input_size`` (default:
    ``size`` itself), rounded: the rings ``ModelConfig.border_offsets`` are indexed by."""
    h, w = size
    hi, wi = input_size or size
    y = np.minimum(np.arange(h), h - 1 - np.arange(h)) * (hi / h)
    x = np.minimum(np.arange(w), w - 1 - np.arange(w)) * (wi / w)
    return np.rint(np.minimum(y[:, None], x[None, :])).astype(np.int64)


@functools.lru_cache(maxsize=16)
def border_matrix(size: tuple[int, int], input_size: tuple[int, int], offsets: tuple[float, ...]) -> np.ndarray:
    """(H, W): ``offsets[d]`` at each pixel of a map of ``size``, d its ring (``border_distance``); the last offset
    beyond."""
    ring = np.minimum(border_distance(size, input_size), len(offsets) - 1)
    return _frozen(torch.from_numpy(np.asarray(offsets, dtype=np.float64)[ring]))


class FastFlow(nn.Module):
    """FastFlow with a frozen backbone.

    Args:
        config: the model configuration (backbone, input size, flow shape, anomaly map).
        weights: backbone weights: "pretrained" (ImageNet; offline for efficientnet_lite*),
            "random" (tests, shape checks), or a path to a local state-dict file.
        backbone: an already built ``FeatureExtractor`` (skips building one).
    """

    def __init__(self, config: ModelConfig, weights: str = "pretrained",
                 backbone: FeatureExtractor | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, weights, config.levels)
        # Shapes come from real feature maps at the configured input size, never from stride arithmetic.
        shapes = self.backbone.feature_shapes(config.input_size)
        self.feature_shapes = shapes  # list of (C_i, H_i, W_i)
        self.norms = nn.ModuleList(
            nn.LayerNorm(list(s), elementwise_affine=config.norm_affine) if self.backbone.needs_norm else nn.Identity()
            for s in shapes
        )
        self.flows = nn.ModuleList(
            Flow2D(c, config.flow_steps, config.hidden_ratio, config.kernels, config.clamp)
            for c, _, _ in shapes
        )
        self._set_roles()

    def _set_roles(self) -> None:
        """Per-level roles (ModelConfig.map_levels / score_levels) as indices into the levels; None: all."""
        config, shapes = self.config, self.feature_shapes
        index = lambda sub: tuple(range(len(shapes))) if sub is None else tuple(config.levels.index(i) for i in sub)
        self.map_index = index(config.map_levels)
        self.score_index = index(config.score_levels) if config.score_levels is not None else self.map_index
        # The image score is the map's max when no score levels are named, or when they are the map's, equally weighted
        # and uncorrected.
        self.score_is_map = config.score_levels is None or (self.score_index == self.map_index and self.map_is_mean)
        # Built now, so that tracing and torch.export see constants.
        self._map_matrices(config.input_size, [shapes[i] for i in self.map_index], self.map_weights)
        self._map_matrices(config.input_size, [shapes[i] for i in self.score_index])

    def set_score_levels(self, levels: tuple[int, ...] | None) -> None:
        """Take the image score from ``levels`` (a subset of ``config.levels``; None: from the map), as if the
        model had been built with ``score_levels=levels``; the flows are unchanged (train.py's score choice)."""
        self.config = replace(self.config, score_levels=levels)
        self._set_roles()

    def set_map_levels(self, levels: tuple[int, ...] | None, weights: tuple[float, ...] | None = None) -> None:
        """Average only ``levels`` (a subset of ``config.levels``; None: all) into the anomaly map, weighted by
        ``weights`` (one per map level; None: equally), as if the model had been built with ``map_levels=levels,
        map_weights=weights``; the flows are unchanged (train.py's map choice). An image score taken from the map
        (no ``score_levels``) follows the levels. The levels are named in the config from then on."""
        self.config = replace(self.config, levels=self.level_ids, map_levels=levels, map_weights=weights)
        self._set_roles()

    def set_border_offsets(self, offsets: tuple[float, ...] | None) -> None:
        """Subtract ``offsets`` (``ModelConfig.border_offsets``; None: nothing) from the anomaly map, as if the model
        had been built with them (train.py's map choice)."""
        self.config = replace(self.config, border_offsets=offsets)
        self._set_roles()

    @property
    def map_weights(self) -> tuple[float, ...] | None:
        """The map levels' weights (``ModelConfig.map_weights``); None: the map levels averaged equally."""
        return self.config.map_weights

    @property
    def map_is_mean(self) -> bool:
        """Whether the anomaly map is its levels' plain mean: neither weighted nor corrected at the border."""
        return not self.map_weights and self.config.border_offsets is None

    @property
    def level_ids(self) -> tuple[int, ...]:
        """The levels' backbone indices (``config.levels``, or the backbone's registered ones), in model order."""
        return tuple(self.config.levels or self.backbone.spec.indices)

    def _level_weight(self, channels: int) -> float:
        """A level's factor in the map: 1 (reference map), or 1 / (2 C) (log-likelihood, nats per channel)."""
        return 1.0 if self.config.anomaly_map == "reference" else 0.5 / channels

    def _map_matrices(self, size: tuple[int, int], shapes: list[tuple[int, int, int]],
                      weights: tuple[float, ...] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
        """The anomaly map's operators (see ``anomaly_map``) from levels of ``shapes`` (C_i, H_i, W_i) to output
        ``size``: per level A_l, and the stacked weighted B_l (the levels' ``weights``, normalised; None: equal).
        Cached per size as NumPy arrays (module level)."""
        sigma = float(self.config.smoothing_sigma)
        lefts = [upsample_blur_matrix(h, int(size[0]), sigma) for _, h, _ in shapes]
        share = [1.0 / len(shapes)] * len(shapes) if weights is None else [w / sum(weights) for w in weights]
        right = _right_matrix(tuple((w, self._level_weight(c) * f) for (c, _, w), f in zip(shapes, share)),
                              int(size[1]), sigma)
        return lefts, right

    # -- training-mode bookkeeping: the backbone is always frozen and in eval mode ------------------
    def train(self, mode: bool = True) -> "FastFlow":
        super().train(mode)
        self.backbone.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def parameter_counts(self) -> dict[str, int]:
        flow = sum(p.numel() for p in self.flows.parameters())
        norm = sum(p.numel() for p in self.norms.parameters())
        return {"flow": flow, "norm": norm, "trainable": flow + norm,
                "backbone": self.backbone.num_parameters}

    # -- the pipeline ---------------------------------------------------------------------------
    def extract(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (B, 3, H, W) -> frozen backbone features, list of (B, C_i, H_i, W_i)."""
        with torch.no_grad():
            return self.backbone(images)

    def forward(self, images: torch.Tensor) -> FastFlowOutput:
        return self.forward_features(self.extract(images), tuple(images.shape[-2:]))

    def forward_features(self, features: list[torch.Tensor], output_size: tuple[int, int] | None = None,
                         with_map: bool = True) -> FastFlowOutput:
        """Run normalisation, flows and the anomaly map on (cached) backbone features.

        ``with_map=False`` (training): skip the map and the score (``None``); the loss is the same, and
        upsampling plus blurring full-size maps would otherwise be a fifth of a training step."""
        zs, log_dets = [], []
        for feat, norm, flow in zip(features, self.norms, self.flows):
            z, log_det_map = flow.forward_map(norm(feat))
            zs.append(z.float())  # no-ops in float32; under autocast (bf16/fp16) the loss and map stay float32
            log_dets.append(log_det_map.float())
        # Per-image NLL (constant 0.5*log(2pi) dropped), per level and summed over levels; loss = batch mean.
        levels = [0.5 * z.pow(2).flatten(1).sum(1) - ld.flatten(1).sum(1) for z, ld in zip(zs, log_dets)]
        nll = sum(levels)
        if self.config.norm_logdet and self.config.norm_affine:  # the affine y = w * x_hat + b: log|det| = sum log|w|
            norm_log_dets = [n.weight.abs().log().sum() if getattr(n, "weight", None) is not None else 0.0
                             for n in self.norms]
            nll = nll - sum(norm_log_dets)
            levels = [level - ld for level, ld in zip(levels, norm_log_dets)]
        level_dims = [z[0].numel() for z in zs]
        dims = sum(level_dims)
        loss = nll.mean()
        nll_per_dim = loss / dims + 0.5 * LOG_2PI
        level_nll = torch.stack([level.detach().mean() + 0.5 * LOG_2PI * d for level, d in zip(levels, level_dims)]) / dims
        if not with_map:
            return FastFlowOutput(zs, log_dets, loss, nll_per_dim, None, None, level_nll)
        size = output_size or self.config.input_size
        pick = lambda idx: ([zs[i] for i in idx], [log_dets[i] for i in idx])
        anomaly_map = self.anomaly_map(*pick(self.map_index), size, self.map_weights)
        if self.config.border_offsets is not None:
            offsets = border_matrix(tuple(int(n) for n in size), self.config.input_size, self.config.border_offsets)
            anomaly_map = anomaly_map - _as_tensor(offsets, anomaly_map)
        score_map = anomaly_map if self.score_is_map else self.anomaly_map(*pick(self.score_index), size)
        score = score_map.flatten(1).amax(dim=1)
        return FastFlowOutput(zs, log_dets, loss, nll_per_dim, anomaly_map, score, level_nll)

    def anomaly_map(self, zs: list[torch.Tensor], log_dets: list[torch.Tensor], size: tuple[int, int],
                    weights: tuple[float, ...] | None = None) -> torch.Tensor:
        """Per-level maps upsampled bilinearly to ``size``, averaged over levels (weighted by ``weights``, one
        per level, normalised; None: equally), then blurred: (B, 1, H, W).

        Upsampling, averaging and the blur are all linear, so they run as one product per axis and level:
        ``sum_l A_l X_l B_l^T`` with ``A_l = M_H U_l`` (blur after upsampling, built once per size,
        ``upsample_blur_matrix``) and the level weights folded into ``B_l``. The same numbers as
        ``F.interpolate`` + mean + ``gaussian_blur`` to float rounding, with a quarter of the multiply-adds
        (lite0 at 256 px: 8.7 M per image against 34 M for blurring the full-size map); measured speed-up:
        bench/README.md (seventh round)."""
        device_type = zs[0].device.type
        if torch.is_autocast_enabled(device_type):  # under --precision bf16/fp16: the map in float32 all the same
            with torch.autocast(device_type, enabled=False):
                return self._anomaly_map(zs, log_dets, size, weights)
        return self._anomaly_map(zs, log_dets, size, weights)

    def _anomaly_map(self, zs: list[torch.Tensor], log_dets: list[torch.Tensor], size: tuple[int, int],
                     weights: tuple[float, ...] | None) -> torch.Tensor:
        left_ops, right_op = self._map_matrices(size, [tuple(int(n) for n in z.shape[1:]) for z in zs], weights)
        lefts = []
        for z, ld, left in zip(zs, log_dets, left_ops):
            if self.config.anomaly_map == "reference":
                level = -torch.exp(-0.5 * z.pow(2).mean(dim=1))
            else:  # nll per dim = (0.5 sum_C z^2 - log|det|) / C + 0.5 log(2 pi); the constant is added at the end
                level = torch.sub(z.pow(2).sum(dim=1), ld, alpha=2.0)  # times _level_weight (in right_op)
            lefts.append(torch.matmul(_as_tensor(left, level), level))
        amap = torch.matmul(torch.cat(lefts, dim=2), _as_tensor(right_op, lefts[0]))
        if self.config.anomaly_map != "reference":
            amap = amap + 0.5 * LOG_2PI
        return amap.unsqueeze(1)

    @torch.no_grad()
    def generate(self, z: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inverse flow: latents (per level) -> normalised features (per level), paper Section 4.5."""
        return [flow.inverse(zi)[0] for flow, zi in zip(self.flows, z)]
