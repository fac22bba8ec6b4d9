"""A run: what ``fastflow train`` writes and every inference command reads.

    model, ckpt = load_run("runs/bottle")          # a run folder, or its model.pt
    ckpt = build_checkpoint(model, train_cfg, ...)  # the dict saved as model.pt (see checkpoint.py)

This module builds, saves and loads runs for everyone (training, evaluation, prediction, export,
inversion). It imports no training code: inference never needs it.
"""

from __future__ import annotations

import os

import torch

from . import __version__
from .checkpoint import FORMAT, CheckpointError, load_safe
from .config import ModelConfig, TrainConfig, from_dict, to_dict
from .data import Preprocess
from .model import FastFlow

MODEL_FILE = "model.pt"  # the selected model of a run folder, with its threshold
ONNX_FILE = "model.onnx"  # what ``fastflow export`` writes by default
# The exported graph's interface (export.py writes it, the ONNX Predictor reads it).
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "anomaly_map")


def sidecar_path(onnx_path: str) -> str:
    """``dir/model.onnx`` -> ``dir/model.json``: the exported graph's description (preprocessing, threshold)."""
    return os.path.splitext(onnx_path)[0] + ".json"


def run_folder(path: str) -> str:
    """The run folder of ``path``: a run folder itself, or the folder of a ``model.pt`` file."""
    return os.path.dirname(path) if path.endswith(".pt") else path


def model_path(path: str) -> str:
    """The checkpoint of ``path``: a ``.pt`` file itself, or the run folder's ``model.pt``."""
    return path if path.endswith(".pt") else os.path.join(path, MODEL_FILE)


def preprocess_for(model: FastFlow) -> Preprocess:
    """The preprocessing a model expects: size and contrast from its config, normalisation from its backbone
    (timm's data config)."""
    return Preprocess.from_config(model.config, model.backbone.mean, model.backbone.std)


def kept_epochs_text(best_epoch: int | None, kept_epochs: list[int] | None) -> str:
    """'epoch 20', or 'epochs 20, 20, 12 (per flow)' when the flows kept different epochs (train.py)."""
    if not kept_epochs or len(set(kept_epochs)) == 1:
        return f"epoch {best_epoch}"
    return f"epochs {', '.join(map(str, kept_epochs))} (per flow)"


def trainable_state(model: FastFlow) -> dict[str, torch.Tensor]:
    """A copy of the model's state apart from the (frozen, rebuildable) backbone, on the CPU whatever the
    model's device (checkpoints load anywhere)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if not k.startswith("backbone.")}


def build_checkpoint(model: FastFlow, train_cfg: TrainConfig, weights: str, threshold: dict | None,
                     extra: dict | None = None) -> dict:
    """The self-describing checkpoint dict of ``model`` (checkpoint.py lists its fields)."""
    ckpt = {
        "format": FORMAT,
        "version": __version__,
        "model_config": to_dict(model.config),
        "train_config": to_dict(train_cfg),
        "preprocess": preprocess_for(model).to_dict(),
        "backbone_weights": weights if weights == "pretrained" else "embedded",
        "state": trainable_state(model),
        "threshold": threshold,
    }
    if weights != "pretrained":
        ckpt["backbone_state"] = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    if extra:
        ckpt.update(extra)
    return ckpt


def model_from_checkpoint(ckpt: dict) -> FastFlow:
    """Rebuild a FastFlow model (the reference form, in eval mode) from a loaded checkpoint dict."""
    try:
        cfg = from_dict(ModelConfig, ckpt["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint's model config does not match this version: {e}") from e
    _check_preprocess(ckpt, cfg)
    embedded = ckpt.get("backbone_weights") == "embedded"
    model = FastFlow(cfg, weights="random" if embedded else "pretrained")
    try:
        if embedded:
            model.backbone.load_state_dict(ckpt["backbone_state"], strict=True)
        missing, unexpected = model.load_state_dict(ckpt["state"], strict=False)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights do not match its config: {str(e).splitlines()[0]}") from e
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not match its config (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    return model.eval()


def _check_preprocess(ckpt: dict, cfg: ModelConfig) -> None:
    """The checkpoint's preprocessing is the one its model config implies (``Preprocess.from_config``):
    the Predictor reads one, the model the other, so a checkpoint where they differ is refused."""
    try:
        pre = Preprocess.from_dict(ckpt["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint's preprocessing does not match this version: {e}") from e
    if not pre.agrees_with(cfg):
        raise CheckpointError(
            f"checkpoint's preprocessing (input_size {list(pre.input_size)}, autocontrast {pre.autocontrast}, "
            f"equalize {pre.equalize}) differs from its model config's ({list(cfg.input_size)}, {cfg.autocontrast}, "
            f"{cfg.equalize}); the file was edited or is corrupt: use the model.pt that fastflow train wrote")


def load_run(path: str) -> tuple[FastFlow, dict]:
    """(model, checkpoint dict) of a run folder (or a model.pt path). The model is the reference form;
    ``fused.for_inference(model)`` gives its fast inference form."""
    ckpt = load_safe(model_path(path))
    return model_from_checkpoint(ckpt), ckpt
