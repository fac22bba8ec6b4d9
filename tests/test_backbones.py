"""Backbones: declared channels and strides, frozen state, genuine offline ImageNet weights."""

import numpy as np
import pytest
import torch
from PIL import Image

from torch import nn

from fastflow.backbones import (BACKBONES, BackboneError, _folded, build_backbone, build_classifier, fold_batchnorm,
                                get_spec)

CNN_EXPECTED = {  # (channels, strides) per level, for the CNN backbones whose builds are cheap
    "efficientnet_lite0": ([24, 40, 112], [4, 8, 16]),
    "resnet18": ([64, 128, 256], [4, 8, 16]),
}


@pytest.mark.parametrize("name", list(CNN_EXPECTED))
def test_cnn_features_keep_declared_channels_and_strides(name):
    fe = build_backbone(name, "random")
    channels, strides = CNN_EXPECTED[name]
    assert fe.channels == channels and fe.strides == strides
    feats = fe(torch.randn(1, 3, 128, 96))
    assert [f.shape[1] for f in feats] == channels
    assert [(128 // s, 96 // s) for s in strides] == [tuple(f.shape[2:]) for f in feats]


def test_vit_feature_map_shape():
    fe = build_backbone("deit_base_distilled_patch16_384", "random")
    assert fe.channels == [768] and fe.strides == [16]
    assert fe.feature_shapes((384, 384)) == [(768, 24, 24)]


def test_unused_efficientnet_blocks_are_dropped_and_batchnorm_folded_without_changing_features():
    import timm

    torch.manual_seed(0)
    fe = build_backbone("efficientnet_lite0", "random")
    torch.manual_seed(0)
    source = timm.create_model("tf_efficientnet_lite0")  # the same random weights fe was built from
    full = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3)).eval()
    full.load_state_dict(source.state_dict(), strict=False)
    full = full.to(memory_format=torch.channels_last)  # the layout fe uses
    assert len(fe.model.blocks) == 5 < len(full.blocks) == 7  # stride-32 stages never run
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fe.modules())  # all folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in full.modules()) > 30
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        for ours, ref in zip(fe(x), full(x.contiguous(memory_format=torch.channels_last)), strict=True):
            assert ours.shape == ref.shape
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_fold_batchnorm_keeps_activations_and_refuses_networks_that_run_out_of_order():
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn, nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
        assert fold_batchnorm(net) == 1
        assert isinstance(net[1], nn.Identity) and net[0].bias is not None
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)

    class OutOfOrder(nn.Module):  # children defined conv, bn, but the BatchNorm runs first
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            with torch.no_grad():
                self.bn.running_mean.fill_(0.5)
                self.bn.running_var.fill_(4.0)

        def forward(self, x):
            return [self.conv(self.bn(x))]

    odd = OutOfOrder().eval()
    assert _folded(odd) is odd  # checked, found different, kept as it was
    assert isinstance(odd.bn, nn.BatchNorm2d)


def test_cpu_micro_batches_give_the_whole_batchs_features():
    torch.manual_seed(0)  # the random weights
    fe = build_backbone("efficientnet_lite0", "random")
    x = torch.randn(5, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fe.cpu_micro_batch = 2  # 2 + 2 + 1 images
        chunked = fe(x)
        fe.cpu_micro_batch = 0  # never split
        whole = fe(x)
    for a, b in zip(chunked, whole, strict=True):
        assert a.shape == b.shape and a.is_contiguous()
        # oneDNN may pick other kernels per batch size: float32 rounding, relative to the features' scale
        # (worst over 20 inputs: 9e-7 of max |feature|; a near-zero element once differed by 2e-3 of itself).
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))


def test_levels_override_the_registered_feature_levels():
    fe = build_backbone("efficientnet_lite0", "random", levels=(1, 2))
    assert fe.channels == [24, 40] and fe.strides == [4, 8]
    assert len(fe.model.blocks) == 3  # nothing after the stride-8 stage is built into the forward


def test_vit_blocks_after_the_used_one_are_pruned_without_changing_features():
    import timm

    torch.manual_seed(0)
    full = timm.create_model("deit_base_distilled_patch16_384", pretrained=False).eval()
    fe = build_backbone("deit_base_distilled_patch16_384", "random")
    fe.model.load_state_dict(full.state_dict(), strict=False)
    assert len(fe.model.blocks) == 8 < len(full.blocks) == 12  # block index 7 is the last one used
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=[7], norm=True, output_fmt="NCHW", intermediates_only=True)
        assert torch.equal(fe(x)[0], ref[0])


def test_backbone_is_frozen_and_stays_in_eval_mode():
    fe = build_backbone("efficientnet_lite0", "random")
    assert not any(p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.training and not any(m.training for m in fe.modules())


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="resnet18"):
        get_spec("resnet19")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("resnet18", str(tmp_path / "nope.pth"))


def test_local_weights_file_round_trip(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    fe = build_backbone("resnet18", str(path))
    ref = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    ref.load_state_dict(src.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(fe(x), ref.eval()(x)):
            torch.testing.assert_close(a, b)


def _classify(model, image: np.ndarray) -> list[int]:
    x = torch.from_numpy(np.array(Image.fromarray(image).resize((224, 224), Image.BICUBIC)))
    x = (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.5  # EfficientNet-Lite expects [-1, 1]
    with torch.no_grad():
        return model(x[None])[0].topk(3).indices.tolist()


def test_offline_lite0_weights_are_genuine_imagenet():
    from skimage import data

    model = build_classifier("efficientnet_lite0", "pretrained")
    assert set(_classify(model, data.chelsea())) & {281, 282, 283, 284, 285, 286, 287}  # a cat class
    assert _classify(model, data.coffee())[0] == 967  # espresso


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_offline_lite1_lite2_weights_load_strictly(name):
    from skimage import data

    assert _classify(build_classifier(name, "pretrained"), data.coffee())[0] == 967


def test_registry_has_the_papers_backbones():
    assert {"resnet18", "wide_resnet50_2", "deit_base_distilled_patch16_384", "cait_m48_448"} <= set(BACKBONES)
