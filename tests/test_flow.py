"""The flow's maths: invertibility, log-determinants, and parity with FrEIA's AllInOneBlock."""

import pytest
import torch
from torch import nn

from fastflow.flow import AffineCouplingStep, Flow2D, conv_subnet_factory, kernel_sizes


def randomise(module: nn.Module, seed: int, scale: float = 0.5) -> nn.Module:
    """Give every parameter random, non-identity values (zero-init subnets would make a trivial flow)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:  # FrEIA keeps its permutation matrix as a frozen Parameter
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def tiny_flow(kernels="3-1", steps=4, channels=5) -> Flow2D:
    torch.manual_seed(0)
    return randomise(Flow2D(channels, steps=steps, hidden_ratio=1.0, kernels=kernels), seed=1).double()


@pytest.mark.parametrize("kernels", ["3-1", "3-3"])
def test_inverse_of_forward_is_identity_float64(kernels):
    # float64 round trip through 4 steps with random weights: error ~1e-14, 1e-9 leaves margin.
    flow = tiny_flow(kernels)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    z, ld = flow(x)
    assert (z - x).abs().max() > 0.1  # the flow is far from the identity
    x_back, ld_inv = flow.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), atol=1e-9, rtol=0)


def test_log_det_matches_autograd_jacobian():
    # Exact slogdet of the full (C*H*W)^2 Jacobian on a tiny input, float64: agree to 1e-8.
    flow = tiny_flow("3-1", steps=3, channels=4)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, ld = flow(x)
    _, ld_map = flow.forward_map(x)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, 4, 3, 3))[0].flatten(), x[b].flatten())
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert abs(logabs.item() - ld[b].item()) < 1e-8
        assert abs(logabs.item() - ld_map[b].sum().item()) < 1e-8


def test_kernel_schemes():
    assert kernel_sizes(4, "3-1") == [3, 1, 3, 1]
    assert kernel_sizes(3, "3-3") == [3, 3, 3]
    flow = Flow2D(8, steps=4, kernels="3-1")
    assert [s.subnet[0].kernel_size for s in flow.steps] == [(3, 3), (1, 1), (3, 3), (1, 1)]
    with pytest.raises(ValueError, match="3-1"):
        kernel_sizes(2, "5-5")


def test_permutation_is_a_buffer_not_a_parameter():
    step = AffineCouplingStep(6, conv_subnet_factory(3, 1.0))
    assert "perm" in dict(step.named_buffers())
    assert all("perm" not in n for n, _ in step.named_parameters())


def test_parity_with_freia_all_in_one_block():
    import FrEIA.modules as Fm  # test-only dependency (PyPI `freia`), installed by `make test`

    channels, hidden = 6, 6
    torch.manual_seed(3)

    def subnet(c_in, c_out):
        return nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, c_out, 3, padding=1))

    ref = Fm.AllInOneBlock([(channels, 5, 4)], subnet_constructor=subnet, affine_clamping=2.0, permute_soft=False)
    ref = randomise(ref.double(), seed=4, scale=0.3)
    # FrEIA stores the permutation as a one-hot matrix w_perm: output[i] = input[argmax_j w[i, j]].
    perm = ref.w_perm.view(channels, channels).argmax(dim=1)
    ours = AffineCouplingStep(channels, lambda i, o: subnet(i, o), clamp=2.0, permutation=perm).double()
    ours.subnet.load_state_dict(ref.subnet.state_dict())
    with torch.no_grad():
        ours.global_scale.copy_(ref.global_scale)
        ours.global_offset.copy_(ref.global_offset)
    x = torch.randn(2, channels, 5, 4, dtype=torch.float64)
    (z_ref,), ld_ref = ref([x])
    z, ld = ours(x)
    torch.testing.assert_close(z, z_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-6, rtol=0)
    (x_ref,), ld_ref_inv = ref([z_ref], rev=True)
    x_ours, ld_inv = ours.inverse(z)
    torch.testing.assert_close(x_ours, x_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ld_inv, ld_ref_inv, atol=1e-6, rtol=0)


def test_odd_channels_and_non_square_maps():
    flow = tiny_flow("3-3", steps=2, channels=7)
    x = torch.randn(1, 7, 2, 9, dtype=torch.float64)
    z, ld_map = flow.forward_map(x)
    assert z.shape == x.shape and ld_map.shape == (1, 2, 9)
    torch.testing.assert_close(flow.inverse(z)[0], x, atol=1e-9, rtol=0)


def test_pointwise_conv_is_a_1x1_convolution_with_the_same_parameters():
    from fastflow.flow import PointwiseConv2d

    pw = randomise(PointwiseConv2d(6, 4), seed=3)
    conv = nn.Conv2d(6, 4, 1)
    conv.load_state_dict(pw.state_dict())  # same keys and shapes: old checkpoints load either way
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    out, ref = pw(x), conv(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, (x, pw.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)
    assert isinstance(tiny_flow("3-1").steps[1].subnet[0], PointwiseConv2d)
    assert type(tiny_flow("3-1").steps[0].subnet[0]) is nn.Conv2d


def test_inference_reuses_the_global_scale_only_while_the_parameter_is_unchanged():
    step = randomise(AffineCouplingStep(6, conv_subnet_factory(3, 1.0)), seed=4)
    x = torch.randn(2, 6, 4, 4)

    def with_autograd():  # the uncached path
        z, ld = step.forward_map(x)
        return z.detach(), ld.detach()

    with torch.inference_mode():
        z0, ld0 = step.forward_map(x)
    torch.testing.assert_close((z0, ld0), with_autograd())
    with torch.no_grad():
        step.global_scale.add_(0.7)  # what an optimiser step or load_state_dict does: in place
    with torch.inference_mode():
        z1, ld1 = step.forward_map(x)
    assert not torch.allclose(ld1, ld0)
    torch.testing.assert_close((z1, ld1), with_autograd())
    loss = step.forward_map(x)[0].sum()  # with autograd the scale is computed afresh: its gradient flows
    loss.backward()
    assert step.global_scale.grad is not None


@pytest.mark.parametrize("kernels,batch", [("3-1", 1), ("3-3", 3)])
def test_fused_inference_path_is_the_same_function(kernels, batch, monkeypatch):
    from fastflow import flow as flow_module

    torch.manual_seed(0)
    flow = randomise(Flow2D(7, steps=4, hidden_ratio=1.0, kernels=kernels), seed=5, scale=0.3)
    x = torch.randn(batch, 7, 5, 9)
    with torch.no_grad():
        z_ref, ld_ref = flow.forward_map(x)  # the plain path
    calls = []
    fused = flow_module.AffineCouplingStep.forward_fused
    monkeypatch.setattr(flow_module.AffineCouplingStep, "forward_fused",
                        lambda self, *a: calls.append(1) or fused(self, *a))
    for onednn in (True, False):  # oneDNN's fused conv + ReLU, and the conv2d fallback
        monkeypatch.setattr(flow_module, "_mkldnn_conv_relu_ok", lambda onednn=onednn: onednn)
        with torch.inference_mode():
            z, ld = flow.forward_map(x)
            _, ld_sum = flow(x)
        torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ld_sum, ld_ref.flatten(1).sum(1), rtol=1e-5, atol=1e-3)
    assert len(calls) == 2 * 2 * 4  # both runs, forward_map and forward, every step: the fused path ran


def test_fused_constants_follow_every_parameter_change():
    step = randomise(AffineCouplingStep(6, conv_subnet_factory(3, 1.0)), seed=6, scale=0.3)
    flow = Flow2D(6, steps=1)
    flow.steps[0] = step
    x = torch.randn(2, 6, 4, 4)
    for name, param in [("conv weight", step.subnet[2].weight), ("offset", step.global_offset),
                        ("scale", step.global_scale), ("first conv bias", step.subnet[0].bias)]:
        with torch.inference_mode():
            before = flow.forward_map(x)
        with torch.no_grad():
            param.add_(0.3)  # in place, as an optimiser step or load_state_dict does
            want = flow.forward_map(x)
        with torch.inference_mode():
            got = flow.forward_map(x)
        assert not (torch.allclose(got[0], before[0]) and torch.allclose(got[1], before[1])), name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_fused_path_of_a_flow_built_in_inference_mode():
    with torch.inference_mode():  # parameters are inference tensors: no version counter to cache on
        torch.manual_seed(0)
        flow = Flow2D(6, steps=2, hidden_ratio=1.0)
        z, ld = flow.forward_map(torch.randn(1, 6, 3, 3))
    assert z.shape == (1, 6, 3, 3) and torch.isfinite(ld).all()


def test_training_path_gradients_match_autograd_of_the_plain_path():
    # The training path (autograd on) runs the hand-written backward of _CouplingTail; the plain
    # operations (no_grad path) differentiated by autograd are the reference. gradcheck in float64
    # compares the hand-written backward with finite differences, the second check with autograd.
    from fastflow.flow import _CouplingTail

    step = randomise(AffineCouplingStep(5, conv_subnet_factory(3, 1.0)), seed=7, scale=0.4).double()
    x1, x2 = (torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True) for c in step.split_sizes)
    a = torch.randn(2, 2 * step.split_sizes[1], 3, 4, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    o = torch.randn(1, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: _CouplingTail.apply(*t, step.perm, step.perm_inv, step.clamp), (x1, x2, a, g, o))

    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    z, ld = step.forward_map(x)  # the training path
    assert z.grad_fn.name().startswith("_CouplingTail")
    wz, wl = torch.randn_like(z), torch.randn_like(ld)
    params = [x] + list(step.parameters())
    got = torch.autograd.grad((z * wz).sum() + (ld * wl).sum(), params)

    def plain(v):  # the plain path's operations (forward_map runs them only without autograd)
        x1, x2 = torch.split(v, step.split_sizes, dim=1)
        log_s, shift = step._coupling(x1)
        y = torch.cat((x1, x2 * torch.exp(log_s) + shift), dim=1)
        scale = step._scale()
        return torch.index_select(y * scale + step.global_offset, 1, step.perm), log_s.sum(1) + torch.log(scale).sum()

    zr, ldr = plain(x)
    torch.testing.assert_close((z, ld), (zr, ldr))
    want = torch.autograd.grad((zr * wz).sum() + (ldr * wl).sum(), params)
    for gw, ww in zip(got, want):
        torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-10)


def test_training_convolutions_run_channels_last_with_the_same_result():
    from fastflow.flow import ConvSubnet

    torch.manual_seed(0)
    sub = ConvSubnet(6, 8, 3, 1.0)
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    seen = []
    sub[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    y = sub(x)
    assert seen == [True] and y.is_contiguous()
    ref = nn.Sequential.forward(sub, x)  # NCHW throughout
    assert seen == [True, False]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0], torch.autograd.grad(ref, x, gy)[0],
                               rtol=1e-5, atol=1e-5)


def test_inference_after_a_fused_optimiser_step_uses_the_new_parameters():
    # Adam(fused=True), the trainer's optimiser, updates parameters without bumping their version
    # counters; the eval() switch before validation must drop the fused path's caches anyway.
    torch.manual_seed(0)
    flow = randomise(Flow2D(6, steps=2, hidden_ratio=1.0, kernels="3-3"), seed=8, scale=0.3)
    x = torch.randn(2, 6, 5, 5)
    opt = torch.optim.Adam(flow.parameters(), lr=0.05, fused=True)
    flow.eval()
    with torch.inference_mode():
        before = flow.forward_map(x)  # fills the caches
    flow.train()
    flow(x)[1].sum().backward()
    opt.step()
    flow.eval()
    with torch.inference_mode():
        got = flow.forward_map(x)
    with torch.no_grad():
        want = flow.forward_map(x)  # the plain path: no cache
    assert not torch.allclose(got[1], before[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_channel_permutation_gather(batch):
    from fastflow.flow import _permute_channels

    x = torch.randn(batch, 7, 4, 5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_permute_channels(x, perm), x[:, perm])
    xt = x.transpose(2, 3)  # not contiguous
    assert torch.equal(_permute_channels(xt, perm), xt[:, perm])
