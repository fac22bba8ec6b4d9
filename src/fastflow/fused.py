"""The inference form of a flow: the reference ``Flow2D`` with its constants folded once into buffers.

    fused = freeze(flow)            # Flow2D -> FusedFlow2D: same function, no autograd, fewer operations
    fast = for_inference(model)     # FastFlow -> a FastFlow whose flows are frozen (backbone shared)

Like ``torch.jit.freeze`` or ``fuse_conv_bn_eval``, this is a transform, not a cache: the folded constants
are computed from the parameters when ``freeze`` is called and never change afterwards. Changing the
trained model (an optimiser step, ``load_state_dict``) does not change its frozen copy: freeze it again.

Per coupling step (see flow.py for the reference maths), 11 tensor operations instead of 19:
    a   = conv2(relu(conv1(x1)))      # conv2's rows and bias pre-scaled (below); ReLU fused into oneDNN's conv
    sig = sigmoid(a_s)                # a_s already holds 0.2 * (subnet's log-scale rows)
    y1  = x1 g1 + o1                  # first half: global affine only
    y2  = x2 exp(2 clamp sig + log g2 - clamp) + a_t    # a_t = 0.1 g2 (subnet's shift rows) + o2
    z   = (y1, y2)[:, perm]
    log|det| map += 2 clamp sum_c sig; + sum_c log g - clamp C2 once per flow
using clamp tanh(0.1 a) = clamp (2 sigmoid(0.2 a) - 1). Folding the 0.1 / 0.2 factors and the second
half's global affine into conv2 is exact (a convolution's bias is added at every position, border included).
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .flow import AffineCouplingStep, ConvSubnet, Flow2D, _permute_channels, _pointwise


@functools.lru_cache(maxsize=None)
def onednn_conv_relu_ok() -> bool:
    """Whether oneDNN's fused convolution + ReLU (``torch.ops.mkldnn._convolution_pointwise``, the kernel
    PyTorch's own compiler emits on the CPU) exists here and agrees with ``conv2d`` + ReLU on a random case."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((2, 5, 7, 6), (4, 5, 3, 3), (4,)))
        with torch.no_grad():
            got = op(x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            want = torch.relu(F.conv2d(x, w, b, padding=1))
        return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))
    except Exception:  # not built with oneDNN, or a PyTorch without the op
        return False


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool, onednn: bool) -> torch.Tensor:
    """A subnet convolution (1x1 or kxk, stride 1, 'same' zero padding), optionally with ReLU."""
    k = weight.shape[-1]
    if k == 1:
        y = _pointwise(x, weight, bias)
    elif onednn and x.device.type == "cpu" and x.dtype == torch.float32 and onednn_conv_relu_ok():
        pad = [k // 2, k // 2]
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pad, [1, 1], [1, 1], 1,
                                                       "relu" if relu else "none", [], "")
    else:
        y = F.conv2d(x, weight, bias, padding=k // 2)
    return y.relu_() if relu else y


class FusedCouplingStep(nn.Module):
    """One ``AffineCouplingStep`` (with a ``ConvSubnet``) folded for inference; every constant is a buffer."""

    def __init__(self, step: AffineCouplingStep, onednn: bool = True):
        super().__init__()
        if not isinstance(step.subnet, ConvSubnet):
            raise TypeError(f"freeze needs ConvSubnet subnets (conv, ReLU, conv), got {type(step.subnet).__name__}")
        self.split_sizes, self.clamp, self.onednn = step.split_sizes, float(step.clamp), onednn
        c1, c2 = step.split_sizes
        conv1, conv2 = step.subnet[0], step.subnet[2]
        with torch.no_grad():
            g = step._scale().reshape(-1)
            o = step.global_offset.reshape(-1)
            g2 = g[c1:].reshape(-1, 1, 1, 1)
            folded = {
                "w1": conv1.weight, "b1": conv1.bias,
                "w2": torch.cat((0.2 * conv2.weight[:c2], 0.1 * g2 * conv2.weight[c2:])),
                "b2": torch.cat((0.2 * conv2.bias[:c2], 0.1 * g[c1:] * conv2.bias[c2:] + o[c1:])),
                "k2": (torch.log(g[c1:]) - self.clamp).view(1, -1, 1, 1),  # log g2 - clamp
                "g1": g[:c1].view(1, -1, 1, 1), "o1": o[:c1].view(1, -1, 1, 1),
                "perm": step.perm,
            }
            for name, value in folded.items():
                self.register_buffer(name, value.detach().clone().contiguous())
            # sum_c log g - clamp C2: this step's per-location log|det| apart from 2 clamp sum_c sig
            self.log_det_const = float(torch.log(g.double()).sum()) - self.clamp * c2

    def forward(self, x: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> z; adds this step's per-location log|det| less ``log_det_const`` to
        ``log_det`` (B, H, W) in place."""
        c1, c2 = self.split_sizes
        x1, x2 = torch.split(x, self.split_sizes, dim=1)
        a = _conv(_conv(x1, self.w1, self.b1, True, self.onednn), self.w2, self.b2, False, self.onednn)
        sig = torch.sigmoid(a[:, :c2])
        two_clamp = 2.0 * self.clamp
        y = torch.empty_like(x)
        torch.addcmul(self.o1, x1, self.g1, out=y[:, :c1])
        torch.addcmul(a[:, c2:], x2, torch.add(self.k2, sig, alpha=two_clamp).exp_(), out=y[:, c1:])
        log_det.add_(sig.sum(dim=1), alpha=two_clamp)
        return _permute_channels(y, self.perm)


class FusedFlow2D(nn.Module):
    """The inference form of a ``Flow2D`` (``freeze``): the same ``forward_map`` / ``forward``, no autograd.

    ``onednn``: run the kxk convolutions as oneDNN's fused convolution + ReLU on float32 CPU tensors
    (where the op exists and agrees with ``conv2d``); False: ``conv2d`` everywhere."""

    def __init__(self, flow: Flow2D, onednn: bool = True):
        super().__init__()
        self.steps = nn.ModuleList(FusedCouplingStep(step, onednn) for step in flow.steps)
        self.log_det_const = sum(step.log_det_const for step in self.steps)

    @torch.no_grad()
    def forward_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> z: (B, C, H, W), log|det| map (B, H, W)."""
        log_det = x.new_zeros(x.shape[0], x.shape[2], x.shape[3])
        for step in self.steps:
            x = step(x, log_det)
        return x, log_det.add_(self.log_det_const)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_det_map = self.forward_map(x)
        return z, log_det_map.flatten(1).sum(dim=1)


def freeze(flow: Flow2D, onednn: bool = True) -> FusedFlow2D:
    """The inference form of ``flow`` (its current parameters, on its device and dtype)."""
    return FusedFlow2D(flow, onednn).eval()


def for_inference(model: nn.Module, onednn: bool = True) -> nn.Module:
    """A copy of a ``FastFlow`` model for inference: its flows frozen (``freeze``), its norms copied, its
    backbone shared (not copied), in eval mode, no parameter requiring gradients. The trained model is
    left unchanged; freeze again after changing it."""
    flows = model.flows
    memo = {id(model.backbone): model.backbone, id(flows): nn.ModuleList()}  # share the backbone, skip the flows
    frozen = copy.deepcopy(model, memo)
    frozen.flows = nn.ModuleList(freeze(flow, onednn) for flow in flows)
    for name, p in frozen.named_parameters():
        if not name.startswith("backbone."):
            p.requires_grad_(False)
    return frozen.eval()
