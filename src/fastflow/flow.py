"""The 2D normalising flow of FastFlow (paper Section 3.3, Eq. 1-3, Figure 2).

A flow maps a feature map x of shape (B, C, H, W) to a latent z of the same shape, one
invertible affine coupling step after another. Each step's Jacobian is triangular (up to the
channel permutation), so its log-determinant is a sum of per-location terms: the log-scales of
the coupled channels at that location plus the global affine's log-scales. We expose that
per-location map (B, H, W), because a true per-pixel log-likelihood needs it.

One coupling step (the reference configuration equals FrEIA's
``AllInOneBlock(affine_clamping=2.0, permute_soft=False)``, the block that anomalib and
gathierry/FastFlow use):

    x1, x2   = split(x)                        # channels: C - C//2 and C//2
    a        = 0.1 * subnet(x1)                # (B, 2 * C//2, H, W)
    s        = clamp * tanh(a[:, :C//2])       # soft-clamped log-scale
    y2       = x2 * exp(s) + a[:, C//2:]
    y        = concat(x1, y2)
    z        = (y * g + o)[:, perm]            # global affine, then fixed permutation
    g        = 0.1 * softplus_{beta=0.5}(g_raw)   (= 1 at initialisation)

    log|det| per location = sum_c s + sum_c log g

The permutation is a buffer applied as an index gather (no 1x1 convolution).

``AffineCouplingStep`` / ``Flow2D`` are the reference: plain tensor operations, differentiated by
autograd; the exactness tests (FrEIA parity, Jacobian, round trip) run on them, and ONNX export traces
them. Two faster forms of the same function sit beside it, each chosen explicitly and tested against it:
  * ``use_fast_backward(module)`` switches the steps to ``_CouplingTail``, the same forward with a
    hand-written backward (the trainer switches it on);
  * ``fastflow.fused.freeze(flow)`` returns the inference form, with the constants folded once into
    buffers (predict, evaluate and validation use it).

Contract of every invertible module here:
    forward(x)  -> (z, log_det)        log_det: (B,), sum of the per-location map
    inverse(z)  -> (x, log_det)        log_det of the inverse map (= -forward's)
    forward_map(x) -> (z, log_det_map) log_det_map: (B, H, W)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SubnetFactory = Callable[[int, int], nn.Module]


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution as one batched matrix product over the flattened positions."""
    b, c, h, w = x.shape
    y = torch.baddbmm(bias.view(1, -1, 1), weight.view(1, -1, c).expand(b, -1, -1), x.reshape(b, c, h * w))
    return y.view(b, -1, h, w)


def _permute_channels(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[:, perm]`` for a (B, C, ...) tensor. For B > 1 as one row gather of the (B*C, rest) view: on the CPU
    faster than ``index_select`` along dim 1 (measured: bench/README.md, R8)."""
    b, c = x.shape[0], x.shape[1]
    if b == 1:
        return torch.index_select(x, 1, perm)
    rows = (torch.arange(b, device=x.device) * c).unsqueeze(1).add(perm).reshape(-1)
    return torch.index_select(x.reshape(b * c, -1), 0, rows).view(x.shape)


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 convolution computed as one matrix product over the flattened positions.

    The parameters (and state-dict keys) of ``nn.Conv2d(in, out, 1)``, the same result to float rounding,
    and on the CPU far less overhead than ``conv2d`` at the flows' small channel counts (measured:
    bench/README.md, R8).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _pointwise(x, self.weight, self.bias)


class ConvSubnet(nn.Sequential):
    """Conv -> ReLU -> Conv, fully convolutional, with explicit symmetric padding.

    ``hidden`` channels are ``int(in_channels * hidden_ratio)`` (as in the reference code).
    Explicit integer padding (not ``padding="same"``) keeps ONNX export simple; 1x1 kernels run as
    ``PointwiseConv2d``. In training on the CPU the kxk convolutions run on a channels_last copy of the
    input (the result is returned contiguous) when ``channels_last`` is set (``use_fast_backward``): oneDNN's
    forward + backward of 3x3 convolutions is faster in that layout, copies included (bench/README.md).
    """

    channels_last = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, hidden_ratio: float):
        hidden = max(1, int(in_channels * hidden_ratio))
        pad = kernel_size // 2
        if kernel_size == 1:
            convs = (PointwiseConv2d(in_channels, hidden), PointwiseConv2d(hidden, out_channels))
        else:
            convs = (nn.Conv2d(in_channels, hidden, kernel_size, padding=pad),
                     nn.Conv2d(hidden, out_channels, kernel_size, padding=pad))
        super().__init__(convs[0], nn.ReLU(), convs[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and self[0].kernel_size[0] > 1 and x.device.type == "cpu":
            return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()
        return super().forward(x)


class _CouplingTail(torch.autograd.Function):
    """What follows the subnet in a coupling step, with a hand-written backward (``use_fast_backward``).

    Forward, the same function as the reference ``AffineCouplingStep.forward_map`` after ``a = subnet(x1)``
    (clamp tanh(0.1 a) written as clamp (2 sigmoid(0.2 a) - 1): PyTorch's CPU sigmoid is faster):
        sig = sigmoid(0.2 a_s)             e = exp(log_s),  log_s = clamp (2 sig - 1)
        u   = x2 e + 0.1 a_t               y = (x1 g1 + o1, u g2 + o2)       z = y[:, perm]
        log|det| map (less sum_c log g) = sum_c log_s
    Backward, with gy = gz[:, perm_inv] (the inverse permutation is a gather, not autograd's scatter):
        dx1 = gy1 g1   dx2 = gy2 g2 e   da_t = 0.1 gy2 g2
        da_s = (gy2 g2 x2 e + g_logdet) * 0.4 clamp sig (1 - sig)
        dg = sum_{b,h,w} (gy1 x1, gy2 u)   do = sum_{b,h,w} gy
    The forward has as many tensor operations as the plain path; the backward takes 15 where autograd's
    chain takes over 20, among them a scatter for the permutation and a zero-filled buffer for every
    slice (bench/README.md has what it buys); tested against autograd of the reference.
    """

    @staticmethod
    def forward(ctx, x1, x2, a, g, o, perm, perm_inv, clamp: float):
        c1, c2 = x1.shape[1], x2.shape[1]
        sig = torch.sigmoid(a[:, :c2] * 0.2)
        e = torch.add(sig, -0.5).mul_(2.0 * clamp).exp_()
        u = torch.addcmul(a[:, c2:] * 0.1, x2, e)
        y = x1.new_empty(x1.shape[0], c1 + c2, *x1.shape[2:])
        torch.addcmul(o[:, :c1], x1, g[:, :c1], out=y[:, :c1])
        torch.addcmul(o[:, c1:], u, g[:, c1:], out=y[:, c1:])
        ctx.save_for_backward(x1, x2, sig, e, u, g, perm_inv)
        ctx.clamp = clamp
        return _permute_channels(y, perm), sig.sum(dim=1).mul_(2.0 * clamp).sub_(clamp * c2)

    @staticmethod
    def backward(ctx, gz, g_log_det):
        x1, x2, sig, e, u, g, perm_inv = ctx.saved_tensors
        c1, c2 = x1.shape[1], x2.shape[1]
        gy = _permute_channels(gz, perm_inv)
        gy1, gy2 = gy[:, :c1], gy[:, c1:]
        dx1 = gy1 * g[:, :c1]
        dg = torch.cat(((gy1 * x1).sum(dim=(0, 2, 3)), (gy2 * u).sum(dim=(0, 2, 3)))).view_as(g)
        do = gy.sum(dim=(0, 2, 3)).view_as(g)
        gu = gy2 * g[:, c1:]
        dx2 = gu * e
        da = x1.new_empty(x1.shape[0], 2 * c2, *x1.shape[2:])
        torch.mul(gu, 0.1, out=da[:, c2:])
        k = 0.4 * ctx.clamp
        d_log_s = torch.addcmul(g_log_det.unsqueeze(1) * k, dx2, x2, value=k)
        torch.mul(d_log_s, torch.addcmul(sig, sig, sig, value=-1.0), out=da[:, :c2])
        return dx1, dx2, da, dg, do, None, None, None


def conv_subnet_factory(kernel_size: int, hidden_ratio: float) -> SubnetFactory:
    def make(c_in: int, c_out: int) -> nn.Module:
        return ConvSubnet(c_in, c_out, kernel_size, hidden_ratio)

    return make


class AffineCouplingStep(nn.Module):
    """One affine coupling step with soft clamping, global affine and a fixed permutation.

    Args:
        channels: C, the number of feature channels.
        subnet_factory: ``f(c_in, c_out) -> nn.Module`` mapping (B, c_in, H, W) to (B, c_out, H, W).
        clamp: alpha of the soft clamp ``alpha * tanh(s)`` on the log-scale (reference: 2.0).
        permutation: a permutation of range(C); random (from the global torch RNG) when None.
    """

    fast_backward = False  # set by use_fast_backward: the part after the subnet runs as _CouplingTail

    def __init__(
        self,
        channels: int,
        subnet_factory: SubnetFactory,
        clamp: float = 2.0,
        permutation: torch.Tensor | None = None,
    ):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling step needs at least 2 channels, got {channels}")
        self.channels = channels
        self.split_sizes = (channels - channels // 2, channels // 2)
        self.clamp = clamp
        self.subnet = subnet_factory(self.split_sizes[0], 2 * self.split_sizes[1])
        # softplus(beta=0.5) scaled by 0.1: raw value chosen so the initial global scale is 1.
        init = 2.0 * math.log(math.exp(5.0) - 1.0)
        self.global_scale = nn.Parameter(torch.full((1, channels, 1, 1), init))
        self.global_offset = nn.Parameter(torch.zeros(1, channels, 1, 1))
        if permutation is None:
            permutation = torch.randperm(channels)
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        if sorted(permutation.tolist()) != list(range(channels)):
            raise ValueError("permutation must be a permutation of range(channels)")
        self.register_buffer("perm", permutation.clone())
        self.register_buffer("perm_inv", torch.argsort(permutation))

    def _scale(self) -> torch.Tensor:
        return 0.1 * F.softplus(self.global_scale, beta=0.5)

    def _coupling(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The subnet's log-scale (soft-clamped) and shift for the second half: each (B, C//2, H, W)."""
        a = self.subnet(x1)
        c2 = self.split_sizes[1]
        return self.clamp * torch.tanh(0.1 * a[:, :c2]), 0.1 * a[:, c2:]

    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> z: (B, C, H, W), per-location log|det|: (B, H, W)."""
        x1, x2 = torch.split(x, self.split_sizes, dim=1)
        scale = self._scale()
        if self.fast_backward:
            z, log_det_map = _CouplingTail.apply(x1, x2, self.subnet(x1), scale, self.global_offset,
                                                 self.perm, self.perm_inv, self.clamp)
            return z, log_det_map + torch.log(scale).sum()
        log_s, shift = self._coupling(x1)
        y = torch.cat((x1, x2 * torch.exp(log_s) + shift), dim=1)
        z = torch.index_select(y * scale + self.global_offset, 1, self.perm)  # faster than y[:, perm] (bench/README.md)
        return z, log_s.sum(dim=1) + torch.log(scale).sum()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det_map = self.forward_map(x)
        return z, log_det_map.flatten(1).sum(dim=1)

    def inverse_map(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (B, C, H, W) -> x, per-location log|det| of the inverse: (B, H, W)."""
        scale = self._scale()
        y = (torch.index_select(z, 1, self.perm_inv) - self.global_offset) / scale
        y1, y2 = torch.split(y, self.split_sizes, dim=1)
        log_s, shift = self._coupling(y1)
        x = torch.cat((y1, (y2 - shift) * torch.exp(-log_s)), dim=1)
        log_det_map = -(log_s.sum(dim=1) + torch.log(scale).sum())
        return x, log_det_map

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det_map = self.inverse_map(z)
        return x, log_det_map.flatten(1).sum(dim=1)


def use_fast_backward(module: nn.Module, on: bool = True) -> nn.Module:
    """Switch every coupling step inside ``module`` to the hand-written backward (``_CouplingTail``) and
    its 3x3 subnet convolutions to channels_last on the CPU (``on=False``: back to the reference). The
    same function and gradients to float rounding; the state dict is unchanged. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, AffineCouplingStep):
            m.fast_backward = on
        elif isinstance(m, ConvSubnet):
            m.channels_last = on
    return module


def kernel_sizes(steps: int, kernels: str) -> list[int]:
    """Subnet kernel per step: "3-1" alternates 3x3 and 1x1 (3x3 first), "3-3" is 3x3 only."""
    if kernels == "3-1":
        return [3 if i % 2 == 0 else 1 for i in range(steps)]
    if kernels == "3-3":
        return [3] * steps
    raise ValueError(f"unknown kernel scheme {kernels!r}; use '3-1' or '3-3'")


class Flow2D(nn.Module):
    """A sequence of coupling steps on (B, C, H, W) feature maps.

    Args:
        channels: C.
        steps: number of coupling steps (paper: 8 for ResNets, 20 for ViTs).
        hidden_ratio: subnet hidden channels / subnet input channels (paper Table 7).
        kernels: "3-1" (alternate 3x3 and 1x1) or "3-3" (3x3 only), paper Table 5.
        clamp: soft-clamp alpha of the log-scale.
    """

    def __init__(self, channels: int, steps: int = 8, hidden_ratio: float = 1.0,
                 kernels: str = "3-1", clamp: float = 2.0):
        super().__init__()
        if steps < 1:
            raise ValueError(f"a flow needs at least one step, got {steps}")
        self.steps = nn.ModuleList(
            AffineCouplingStep(channels, conv_subnet_factory(k, hidden_ratio), clamp=clamp)
            for k in kernel_sizes(steps, kernels)
        )

    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> z: (B, C, H, W), log|det| map (B, H, W)."""
        log_det = x.new_zeros(x.shape[0], x.shape[2], x.shape[3])
        for step in self.steps:
            x, ld = step.forward_map(x)
            log_det = log_det + ld
        return x, log_det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det_map = self.forward_map(x)
        return z, log_det_map.flatten(1).sum(dim=1)

    def inverse_map(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_det = z.new_zeros(z.shape[0], z.shape[2], z.shape[3])
        for step in reversed(self.steps):
            z, ld = step.inverse_map(z)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_det_map = self.inverse_map(z)
        return x, log_det_map.flatten(1).sum(dim=1)
