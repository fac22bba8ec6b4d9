"""Test helpers shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


def randomise(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Give every parameter random, non-identity values (zero-init subnets would make a trivial flow)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # FrEIA keeps its permutation matrix as a frozen Parameter
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def assert_invertible(flow: nn.Module, x: torch.Tensor, atol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor]:
    """The invertible-module contract of flow.py on ``x`` (use float64 and random, non-identity weights):
    inverse(forward(x)) == x, the two log-dets cancel, ``forward``'s log-det is the sum of ``forward_map``'s,
    and the module is far from the identity (so the round trip is not trivially true). Returns (z, log_det).

    Tolerance: float64 round trips through a few steps err by ~1e-14; ``atol`` 1e-9 leaves margin."""
    z, log_det = flow(x)
    z_map, log_det_map = flow.forward_map(x)
    assert z.shape == x.shape and log_det.shape == (x.shape[0],) and log_det_map.shape == (x.shape[0], *x.shape[2:])
    assert (z - x).abs().max() > 0.1, "the flow is (nearly) the identity: the round trip would prove nothing"
    torch.testing.assert_close(z_map, z, atol=atol, rtol=0)
    torch.testing.assert_close(log_det_map.flatten(1).sum(1), log_det, atol=atol, rtol=0)
    x_back, log_det_inv = flow.inverse(z)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=0)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros_like(log_det), atol=atol, rtol=0)
    return z, log_det


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run ``fastflow ARGS`` in-process: (exit code, stdout, stderr)."""
    from fastflow.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors and --help
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
