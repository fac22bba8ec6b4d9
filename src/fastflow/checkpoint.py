"""Self-describing checkpoints that cannot run code on load.

A checkpoint is a plain dict of tensors and JSON-like values saved with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: a file crafted to execute code when unpickled is
refused by the restricted unpickler instead. Writes are atomic (temporary file, fsync, rename),
so a run killed at any moment leaves the previous checkpoint intact.

Contents of ``model.pt`` (what ``Predictor`` and ``evaluate`` need):
    format, version            checkpoint format number and fastflow version that wrote it
    model_config               ModelConfig as a dict
    train_config               TrainConfig as a dict
    preprocess                 input size, resize method, mean, std
    backbone_weights           "pretrained" or what the user passed; "embedded" when the state is inside
    state                      trainable state (norms, flows, permutation buffers)
    backbone_state             only when the backbone cannot be rebuilt from its name (random/local file)
    threshold                  calibrated on held-out normals: {value, false_alarm_rate, val_scores...}
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import IO, Any, Callable

import torch

from . import __version__

FORMAT = 1
REQUIRED = ("model_config", "train_config", "preprocess", "state")  # dict fields every checkpoint has


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why and what to do."""


def atomic_write(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
    """``write(f)`` into a temporary file beside ``path`` (``.tmp-*`` plus path's extension), fsync, then
    atomically replace ``path``: a reader, or a run killed at any moment, sees the old file or the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is as readable as any new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (``atomic_write``). Tensors are written as CPU tensors
    whatever device they are on (``load_safe`` maps to the CPU too), so a checkpoint saved on a GPU loads on
    any machine."""
    from .device import to_cpu

    atomic_write(path, lambda f: torch.save(to_cpu(obj), f), binary=True)


def _umask() -> int:
    """The process's file-creation mask (read by setting it, then restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# How a torch.save file begins: a zip archive (torch >= 1.6), or a raw pickle (protocol 2+, legacy format).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _looks_like_torch_file(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return any(head.startswith(m) for m in _TORCH_MAGIC)


def load_safe(path: str) -> dict[str, Any]:
    """Load a checkpoint with the restricted (weights-only) unpickler; clear errors for bad files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path!r} (expected a run folder with model.pt)")
    if not _looks_like_torch_file(path):  # text, an image, an empty file: not a pickle an attacker crafted
        size = os.path.getsize(path)
        raise CheckpointError(f"{path}: not a fastflow checkpoint ({'empty file' if size == 0 else 'not a torch.save file'}"
                              f"); point to the model.pt that fastflow train wrote, or retrain")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain values "
            f"(it could run code). Only load checkpoints written by fastflow. ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}); retrain or "
                              f"use an intact copy") from e
    if not isinstance(obj, dict) or obj.get("format") is None:
        raise CheckpointError(f"{path}: not a fastflow checkpoint (no 'format' field)")
    if obj["format"] != FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {obj['format']} (written by fastflow {obj.get('version', '?')}) is not "
            f"readable by fastflow {__version__} (format {FORMAT}); retrain with this version"
        )
    missing = [k for k in REQUIRED if not isinstance(obj.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {', '.join(missing)}); retrain, or use the "
                              f"model.pt that fastflow train wrote")
    return obj
