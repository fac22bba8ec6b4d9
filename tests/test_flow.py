"""The flow's maths: invertibility, log-determinants, and parity with FrEIA's AllInOneBlock.

The exactness tests run on the reference (``AffineCouplingStep`` / ``Flow2D`` as built, plain operations);
the two faster forms, the hand-written backward (``use_fast_backward``) and the inference form
(``fused.freeze``), are each tested equal to it.
"""

import copy

import pytest
import torch
from helpers import assert_invertible, randomise
from torch import nn

from fastflow.flow import AffineCouplingStep, Flow2D, conv_subnet_factory, kernel_sizes, use_fast_backward
from fastflow.fused import for_inference, freeze


def is_reference(flow: nn.Module) -> bool:
    return not any(getattr(m, "fast_backward", False) or getattr(m, "channels_last", False) for m in flow.modules())


def tiny_flow(kernels="3-1", steps=4, channels=5) -> Flow2D:
    torch.manual_seed(0)
    return randomise(Flow2D(channels, steps=steps, hidden_ratio=1.0, kernels=kernels), seed=1).double()


@pytest.mark.parametrize("kernels", ["3-1", "3-3"])
def test_inverse_of_forward_is_identity_float64(kernels):
    flow = tiny_flow(kernels)
    assert is_reference(flow)
    assert_invertible(flow, torch.randn(3, 5, 6, 7, dtype=torch.float64))


def test_log_det_matches_autograd_jacobian():
    # Exact slogdet of the full (C*H*W)^2 Jacobian on a tiny input, float64: agree to 1e-8.
    flow = tiny_flow("3-1", steps=3, channels=4)
    assert is_reference(flow)
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
    assert is_reference(ours)
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
    assert_invertible(flow, torch.randn(1, 7, 2, 9, dtype=torch.float64))


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


def test_the_hand_written_backward_is_gradchecked():
    # gradcheck in float64 compares _CouplingTail's backward with finite differences of its forward.
    from fastflow.flow import _CouplingTail

    step = randomise(AffineCouplingStep(5, conv_subnet_factory(3, 1.0)), seed=7, scale=0.4).double()
    x1, x2 = (torch.randn(2, c, 3, 4, dtype=torch.float64, requires_grad=True) for c in step.split_sizes)
    a = torch.randn(2, 2 * step.split_sizes[1], 3, 4, dtype=torch.float64, requires_grad=True)
    g = (torch.rand(1, 5, 1, 1, dtype=torch.float64) + 0.5).requires_grad_()
    o = torch.randn(1, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: _CouplingTail.apply(*t, step.perm, step.perm_inv, step.clamp), (x1, x2, a, g, o))


@pytest.mark.parametrize("kernels", ["3-1", "3-3"])
def test_fast_backward_equals_autograd_of_the_reference(kernels):
    # float64; the two compute the soft clamp differently (tanh vs 2 sigmoid - 1), so they agree to
    # rounding (~1e-15), far inside the 1e-6 stated for the fast backward.
    ref = tiny_flow(kernels, steps=4, channels=5)
    fast = use_fast_backward(copy.deepcopy(ref))
    assert is_reference(ref) and not is_reference(fast)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    outs = {}
    for name, flow in (("ref", ref), ("fast", fast)):
        z, ld = flow.forward_map(x)
        g = torch.Generator().manual_seed(1)
        wz, wl = torch.randn(z.shape, generator=g, dtype=z.dtype), torch.randn(ld.shape, generator=g, dtype=ld.dtype)
        grads = torch.autograd.grad((z * wz).sum() + (ld * wl).sum(), [x] + list(flow.parameters()))
        outs[name] = (z, ld, grads, z.grad_fn.name())
    assert "CouplingTail" in outs["fast"][3] and "CouplingTail" not in outs["ref"][3]  # each form really ran
    torch.testing.assert_close(outs["fast"][:2], outs["ref"][:2], atol=1e-6, rtol=0)
    for got, want in zip(outs["fast"][2], outs["ref"][2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # switching back gives the reference again, and the state dict never changed
    use_fast_backward(fast, False)
    assert is_reference(fast) and fast.state_dict().keys() == ref.state_dict().keys()


def test_grad_mode_does_not_pick_the_implementation():
    flow = tiny_flow("3-1", steps=2, channels=5)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    with torch.inference_mode():
        z_inf, ld_inf = flow.forward_map(x)
    z, ld = flow.forward_map(x.requires_grad_())
    assert "CouplingTail" not in z.grad_fn.name()
    assert torch.equal(z.detach(), z_inf) and torch.equal(ld.detach(), ld_inf)  # the very same operations


@pytest.mark.parametrize("kernels,batch", [("3-1", 1), ("3-3", 3)])
def test_inference_form_equals_the_reference_float64(kernels, batch):
    flow = tiny_flow(kernels, steps=4, channels=7)
    x = torch.randn(batch, 7, 5, 9, dtype=torch.float64)
    with torch.no_grad():
        z_ref, ld_ref = flow.forward_map(x)
    fused = freeze(flow)
    z, ld = fused.forward_map(x)
    torch.testing.assert_close(z, z_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(fused(x)[1], ld_ref.flatten(1).sum(1), atol=1e-9, rtol=0)
    assert all(not p.requires_grad for p in fused.parameters()) and len(list(fused.parameters())) == 0


@pytest.mark.parametrize("onednn", [True, False])
def test_inference_form_float32_with_and_without_onednn(onednn):
    # float32 (where the oneDNN fused conv + ReLU runs): the reference's rounding, ~1e-6.
    torch.manual_seed(0)
    flow = randomise(Flow2D(7, steps=4, hidden_ratio=1.0, kernels="3-3"), seed=5, scale=0.3)
    x = torch.randn(2, 7, 5, 9)
    with torch.no_grad():
        z_ref, ld_ref = flow.forward_map(x)
    z, ld = freeze(flow, onednn=onednn).forward_map(x)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-4)


def test_inference_form_is_a_snapshot_not_a_cache():
    # The folded constants are computed once by freeze: changing the trained flow afterwards (here a
    # fused Adam step, which bumps no version counter) leaves the frozen form as it was; freezing again
    # gives the new function. Nothing watches parameter versions.
    flow = tiny_flow("3-3", steps=2, channels=6).float()
    x = torch.randn(2, 6, 5, 5)
    frozen = freeze(flow)
    before = frozen.forward_map(x)
    opt = torch.optim.Adam(flow.parameters(), lr=0.05, fused=True)
    flow(x)[1].sum().backward()
    opt.step()
    torch.testing.assert_close(frozen.forward_map(x), before, rtol=0, atol=0)
    with torch.no_grad():
        want = flow.forward_map(x)
    assert not torch.allclose(want[1], before[1])
    torch.testing.assert_close(freeze(flow).forward_map(x), want, rtol=1e-5, atol=1e-4)


def test_for_inference_model_shares_the_backbone_and_leaves_the_model_alone():
    from fastflow.config import ModelConfig
    from fastflow.model import FastFlow

    torch.manual_seed(0)
    model = FastFlow(ModelConfig(input_size=(64, 64), flow_steps=2), weights="random").eval()
    for flow in model.flows:
        randomise(flow, seed=2, scale=0.05)
    fast = for_inference(model)
    assert fast.backbone is model.backbone and fast.flows is not model.flows
    assert all(isinstance(f, Flow2D) for f in model.flows) and model.flows[0].steps[0].global_scale.requires_grad
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
    got = fast(images)
    torch.testing.assert_close(got.anomaly_map, want.anomaly_map, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-3)


def test_training_convolutions_run_channels_last_with_the_same_result():
    from fastflow.flow import ConvSubnet

    torch.manual_seed(0)
    sub = ConvSubnet(6, 8, 3, 1.0)
    sub.channels_last = True  # what use_fast_backward sets
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


@pytest.mark.parametrize("batch", [1, 3])
def test_channel_permutation_gather(batch):
    from fastflow.flow import _permute_channels

    x = torch.randn(batch, 7, 4, 5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_permute_channels(x, perm), x[:, perm])
    xt = x.transpose(2, 3)  # not contiguous
    assert torch.equal(_permute_channels(xt, perm), xt[:, perm])
