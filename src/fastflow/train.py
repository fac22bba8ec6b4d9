"""Training by maximum likelihood on normal images only (paper Section 4.7).

    fastflow train --data ROOT --category NAME --output RUN_DIR

The recipe: Adam (lr 1e-3, weight decay 1e-5), batch 32, the preset's epochs. Part of the normal
training images is held out as a validation set: its likelihood selects the best epoch (or, with
``keep_epoch="last"`` as in the lite presets, only skips epochs that diverged from it) and its image scores
calibrate the decision threshold. The test set never steers training. The epoch is chosen per flow: the
levels' flows have their own parameters and the loss is their sum, so each flow's own best epoch gives the
model the lowest held-out NLL, and one flow that overfits does not pull the others back.

The backbone is frozen, so without augmentation its features are computed once and reused every
epoch (``cache_features``): exactly the same model, several times faster.

Under torchrun the same function trains one model on several processes (``dist``): each rank
caches and runs the flow on its own fixed share of the images and the gradients are summed over
ranks, exactly as one process with the same global batch; see distributed.py.

A run folder holds:
    model.pt        the selected model, self-describing (see checkpoint.py), with its threshold
    checkpoint.pt   the last epoch's full training state, for ``--resume``
    history.json    per-epoch train / validation NLL (nats per dimension) and timings
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, load_safe, save_atomic
from .config import DEFAULT_PRESET, ModelConfig, Preset, TrainConfig, from_dict, get_preset, to_dict
from .data import AnomalyDataset, DecodedImages, Sample, check_readable
from .device import autocast, fits_in_memory, follow_load, grad_scaler, resolve_device
from .distributed import SINGLE, Dist
from .flow import use_fast_backward
from .fused import for_inference
from .model import FastFlow
from .run import build_checkpoint, kept_epochs_text, preprocess_for, trainable_state


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); the message says where and what to do."""


def planned_epochs(train_cfg: TrainConfig, n_fit: int) -> int:
    """Epochs a run trains: ``train_cfg.epochs``, or with a step budget (``train_cfg.steps``) enough epochs
    of ceil(n_fit / batch_size) optimiser steps each to reach it, at most ``train_cfg.epochs``."""
    if train_cfg.steps is None:
        return train_cfg.epochs
    per_epoch = max(1, math.ceil(n_fit / train_cfg.batch_size))
    return max(1, min(train_cfg.epochs, math.ceil(train_cfg.steps / per_epoch)))


def split_validation(samples: list[Sample], fraction: float, seed: int,
                     minimum: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Deterministically hold out ``fraction`` of the normal training samples (at least one if > 0), and at
    least ``minimum`` of them while that is at most a fifth of the set (TrainConfig.val_min). A larger hold-out
    of the same seed contains the smaller one."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(samples)), min(minimum, len(samples) // 5))
    n_val = min(len(samples) - 1, n_val)
    val = sorted(order[:n_val])
    fit = sorted(order[n_val:])
    return [samples[i] for i in fit], [samples[i] for i in val]


@torch.inference_mode()
def extract_features(model: FastFlow, dataset: AnomalyDataset | None, batch_size: int, precision: str = "fp32",
                     store: torch.device | None = None) -> list[torch.Tensor]:
    """Backbone features of every image: list over levels of (N, C_i, H_i, W_i) (N = 0 for no dataset),
    computed on the model's device and kept on ``store`` (default: that device)."""
    device = next(model.parameters()).device
    store = device if store is None else store
    if dataset is None:
        return [torch.empty(0, c, h, w, device=store) for c, h, w in model.feature_shapes]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    levels: list[list[torch.Tensor]] = []
    for batch in loader:
        follow_load()
        with autocast(device, precision):
            feats = model.extract(batch["image"].to(device))
        if not levels:
            levels = [[] for _ in feats]
        for kept, f in zip(levels, feats):
            kept.append(f.to(store, copy=True))
    return [torch.cat(kept) for kept in levels]


def cache_device(model: FastFlow, n_images: int, device: torch.device) -> torch.device:
    """Where the feature cache of ``n_images`` lives: on ``device`` when it takes at most half of its free
    memory (float32 estimate from the feature shapes), else in host memory (batches then move per step)."""
    nbytes = 4 * n_images * sum(c * h * w for c, h, w in model.feature_shapes)
    return device if fits_in_memory(nbytes, device) else torch.device("cpu")


class FeatureSource:
    """Batches of backbone features for training: cached once, or recomputed (augmentation on).

    Sharded (``dist.world`` > 1): of the ``n`` images, image i belongs to rank i % world, and
    ``dataset`` holds only this rank's (``dist.owned(samples)``; None when it owns none).
    """

    def __init__(self, model: FastFlow, dataset: AnomalyDataset | None, cache: bool, batch_size: int,
                 n: int | None = None, dist: Dist = SINGLE, precision: str = "fp32"):
        self.model, self.dataset, self.batch_size, self.dist = model, dataset, batch_size, dist
        self.n = len(dataset) if n is None else n
        self.precision = precision
        self.cached = None
        if cache:
            store = cache_device(model, len(dataset) if dataset is not None else 0, dist.device)
            self.cached = extract_features(model, dataset, batch_size, precision, store)

    def __len__(self) -> int:
        return self.n

    def steps(self, epoch: int, seed: int, shuffle: bool = True, noise: float = 0.0):
        """Per global batch: (this rank's features of it, or None if it owns none of it; batch size).
        ``noise`` > 0: with ``add_feature_noise`` applied, image i's draw keyed by (seed, epoch, i)."""
        n, world = self.n, self.dist.world
        if shuffle:  # the order depends only on (seed, epoch): a resumed run sees the same batches
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        else:
            order = torch.arange(n)
        for start in range(0, n, self.batch_size):
            follow_load()  # the thread count, between two steps (CLI train: device.py)
            idx = order[start:start + self.batch_size]
            owned = idx[idx % world == self.dist.rank] if world > 1 else idx  # global image numbers
            mine = owned // world  # positions in the shard
            if len(mine) == 0:
                yield None, len(idx)
                continue
            if self.cached is not None:  # on the device, or moved there per batch (cache in host memory)
                feats = [level[mine.to(level.device)].to(self.dist.device, non_blocking=True) for level in self.cached]
            else:
                images = torch.stack([self.dataset[int(i)]["image"] for i in mine])
                with autocast(self.dist.device, self.precision):
                    feats = self.model.extract(images.to(self.dist.device))
            if noise > 0:
                feats = add_feature_noise(feats, noise, [(seed * 1000003 + epoch) * 1000003 + int(i) for i in owned])
            yield feats, len(idx)

    def batches(self, epoch: int, seed: int, shuffle: bool = True):
        """This rank's features of each batch (all of each batch in a single process)."""
        for feats, _ in self.steps(epoch, seed, shuffle):
            if feats is not None:
                yield feats


@dataclass
class TrainResult:
    run_dir: str
    best_epoch: int  # the latest epoch kept by any flow
    best_val_nll: float | None
    threshold: float
    epochs_run: int
    train_seconds: float
    history: list[dict]
    kept_epochs: list[int] = field(default_factory=list)  # per flow, in the model's level order
    score_choice: dict | None = None  # TrainConfig.choose_score's report (auto.choose_score), else None
    map_choice: dict | None = None  # TrainConfig.choose_map's report (auto.choose_map), else None

    def kept(self) -> str:
        return kept_epochs_text(self.best_epoch, self.kept_epochs)


def add_feature_noise(feats: list[torch.Tensor], sigma: float, keys: list[int]) -> list[torch.Tensor]:
    """Noise regularisation of the flows' inputs: per level, ``f + sigma * std(f) * N(0, 1)``, with the
    std taken per image over (C, H, W) (the scale the LayerNorm removes), so ``sigma`` means the same on
    every level and backbone. Image j's noise comes from a generator seeded with ``keys[j]``: a function of
    (seed, epoch, image), so it does not depend on batching, sharding over ranks or resuming."""
    gens = [torch.Generator().manual_seed(int(k)) for k in keys]
    out = []
    for f in feats:
        noise = torch.stack([torch.randn(tuple(f.shape[1:]), generator=g) for g in gens]).to(f.device, f.dtype)
        out.append(f + sigma * f.std(dim=tuple(range(1, f.dim())), keepdim=True) * noise)
    return out


@torch.inference_mode()
def _mean_nll(model: FastFlow, source: FeatureSource) -> list[float]:
    """The held-out NLL of each flow, as its share of the model's nats per dimension (``level_nll``: they sum
    to the model's held-out NLL)."""
    model = for_inference(model)  # the current parameters, folded once for this pass
    total = torch.zeros(len(model.flows) + 1, dtype=torch.float64)  # per level, then the image count
    for feats in source.batches(0, 0, shuffle=False):
        out = model.forward_features(feats, with_map=False)
        n = feats[0].shape[0]
        total += torch.cat([out.level_nll.double().cpu() * n, torch.tensor([n], dtype=torch.float64)])
    if source.dist.world > 1:
        total = source.dist.all_reduce_sum(total.to(source.dist.device)).cpu()
    return (total[:-1] / max(float(total[-1]), 1.0)).tolist()


@torch.inference_mode()
def _scores(model: FastFlow, source: FeatureSource) -> np.ndarray:
    """Image scores of every image of ``source`` (gathered from all ranks when sharded)."""
    model = for_inference(model)
    size = model.config.input_size
    parts = [model.forward_features(f, size).score.float().cpu().numpy() for f in source.batches(0, 0, False)]
    parts = [p for rank_parts in source.dist.gather_objects(parts) for p in rank_parts]
    return np.concatenate(parts)


def train(model_cfg: ModelConfig | Preset | None = None, train_cfg: TrainConfig | None = None,
          samples: list[Sample] | None = None, run_dir: str | None = None,
          weights: str = "pretrained", resume: bool = False, progress: bool = True,
          log=print, dist: Dist = SINGLE, device: str | torch.device | None = "auto",
          precision: str = "fp32", decoded: DecodedImages | None = None, save_every_epoch: bool = True) -> TrainResult:
    """Train FastFlow on normal ``samples`` and write the run folder ``run_dir``.

    ``model_cfg``: a ``ModelConfig``, a ``Preset`` (``get_preset("resnet18")``: its model and, unless
    ``train_cfg`` is given, its training config), or None: ``DEFAULT_PRESET``'s, what ``fastflow train
    --backbone efficientnet_lite0`` trains. ``train_cfg`` None: that preset's training config (with a
    ``ModelConfig``, ``train_cfg`` is required).

        train(samples=load_samples("mvtec", "data/mvtec", "bottle", "train"), run_dir="runs/bottle")
        train(ModelConfig.from_preset("resnet18", input_size=224), TrainConfig.from_preset("resnet18", epochs=50),
              samples, "runs/bottle-r18")

    ``dist``: this process's place in a torchrun job (``distributed.init_from_env()``); every rank
    calls ``train`` with the same arguments, rank 0 logs and writes the files.
    ``device``: auto, cpu, cuda, cuda:N or mps (device.py; under torchrun each rank's own device wins);
    ``precision``: fp32, bf16 or fp16 (autocast of the forward passes; fp16 on CUDA with a gradient scaler).
    ``decoded``: a ``DecodedImages`` shared by several trainings on the same images, so that each image is read
    once (auto.py's probes); ``save_every_epoch`` False: ``checkpoint.pt`` only after the last epoch (a training
    that will not be resumed halfway, such as a probe).

    Training seeds the random generators with ``train_cfg.seed`` (the initialisation and augmentation
    draw from them) inside a fork: the caller's torch and NumPy random states are as they were after.
    """
    if samples is None or run_dir is None:
        raise TypeError("train() needs samples (load_samples(...)) and run_dir (the folder to write)")
    model_cfg, train_cfg = _resolve_configs(model_cfg, train_cfg)
    if dist.world == 1:
        dist = replace(dist, device=resolve_device(device))
    cuda = [dist.device.index or 0] if dist.device.type == "cuda" else []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            return _train(model_cfg, train_cfg, samples, run_dir, weights, resume, progress, log, dist, precision,
                          decoded, save_every_epoch)
    finally:
        np.random.set_state(numpy_state)


def _resolve_configs(model_cfg: ModelConfig | Preset | None, train_cfg: TrainConfig | None
                     ) -> tuple[ModelConfig, TrainConfig]:
    """The (model, training) configs ``train`` runs: a preset's, ``DEFAULT_PRESET``'s for None."""
    if train_cfg is not None and not isinstance(train_cfg, TrainConfig):
        raise TypeError(f"train_cfg must be a TrainConfig or None, got {type(train_cfg).__name__}; with a preset, "
                        f"pass samples and run_dir by name: train(get_preset(NAME), samples=..., run_dir=...)")
    preset = get_preset(DEFAULT_PRESET) if model_cfg is None else model_cfg
    if isinstance(preset, Preset):
        return preset.model, preset.train if train_cfg is None else train_cfg
    if not isinstance(model_cfg, ModelConfig):
        raise TypeError(f"model_cfg must be a ModelConfig, a Preset or None, got {type(model_cfg).__name__}")
    if train_cfg is None:  # which preset's training would be a guess: the user says it
        raise TypeError("train() with a ModelConfig needs its train_cfg too, e.g. TrainConfig.from_preset(NAME); "
                        "or pass get_preset(NAME), or neither for the default preset")
    return model_cfg, train_cfg


def _train(model_cfg: ModelConfig, train_cfg: TrainConfig, samples: list[Sample], run_dir: str, weights: str,
           resume: bool, progress: bool, log, dist: Dist, precision: str, decoded: DecodedImages | None,
           save_every_epoch: bool) -> TrainResult:
    """The steps of ``train``: a seeded model and sharded data, the feature cache, resuming, the epochs,
    the selection of the best epoch with its threshold, the run folder's files."""
    model, fit_samples, val_samples = _seeded_model(model_cfg, train_cfg, samples, weights, run_dir, dist, decoded)
    if dist.world > 1 and not dist.is_main:
        log, progress = (lambda *a, **k: None), False
    t_start = time.perf_counter()
    fit, val = _feature_sources(model, fit_samples, val_samples, train_cfg, dist, precision, decoded)
    t_features = time.perf_counter() - t_start
    loop = _Loop.start(model, fit, val, train_cfg, weights, dist, precision, os.path.join(run_dir, "checkpoint.pt"))
    _remove_partial_saves(run_dir, dist)
    epochs = planned_epochs(train_cfg, len(fit_samples))
    if resume:
        _resume(loop, model_cfg, run_dir, epochs, log)
    _run_epochs(loop, epochs, progress, save_every_epoch)
    _free_training_state(loop)
    if train_cfg.keep_epoch == "last" and loop.val is not None:
        _log_early_kept(loop, log)
    choices = _select_best(loop, log, val_samples)
    threshold = _calibrate(loop, run_dir, log)
    seconds = time.perf_counter() - t_start
    _write_run(loop, threshold, choices, run_dir, len(fit_samples), len(val_samples), {
        "feature_cache_seconds": t_features, "train_seconds": seconds,
        "cache_features": train_cfg.cache_features and not train_cfg.augment})
    dist.barrier()  # the run folder is complete when train returns, on every rank
    return TrainResult(run_dir, loop.best_epoch + 1, loop.best_val_nll, threshold["value"], len(loop.history), seconds,
                       loop.history, [e + 1 for e in loop.best["epochs"]], choices.get("score_choice"),
                       choices.get("map_choice"))


def _free_training_state(loop: _Loop) -> None:
    """After the last epoch, free what only the epochs use: the training images' cached features, the gradients and
    Adam's moments (checkpoint.pt holds them). The choices after training then peak lower: on Magnetic Tile they were
    the run's peak (bench/README.md, twenty-third round)."""
    loop.fit.cached = None
    loop.opt.zero_grad(set_to_none=True)
    loop.opt.state.clear()


def _log_early_kept(loop: _Loop, log) -> None:
    """Say which flows (by stride) kept an epoch before the last, and why."""
    size = loop.model.config.input_size[0]
    early = [f"the stride-{size // h} flow epoch {e + 1}" for e, (_, h, _) in zip(loop.best["epochs"], loop.model.feature_shapes)
             if e + 1 < len(loop.history)]
    if early:
        log(f"kept {', '.join(early)}, not the last ({len(loop.history)}): its held-out NLL at every later epoch was "
            f"more than {loop.train_cfg.keep_last_within:g} nats/dim above its lowest (overfitting: fewer epochs or "
            f"more images)")


def _seeded_model(model_cfg: ModelConfig, train_cfg: TrainConfig, samples: list[Sample], weights: str,
                  run_dir: str, dist: Dist, decoded: DecodedImages | None) -> tuple[FastFlow, list[Sample], list[Sample]]:
    """The model initialised from ``train_cfg.seed`` (the same on every rank), and the (fit, validation)
    split; then, sharded, each rank's random generators seeded for its own augmentation draws."""
    if not samples:
        raise TrainingError("no normal training images: nothing to learn from")
    check_readable(samples if decoded is None else decoded.unread(samples))  # every unreadable file at once, first
    torch.manual_seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    model = use_fast_backward(FastFlow(model_cfg, weights=weights).to(dist.device))
    fit_samples, val_samples = split_validation(samples, train_cfg.val_fraction, train_cfg.seed, train_cfg.val_min)
    os.makedirs(run_dir, exist_ok=True)
    if dist.world > 1:
        dist.broadcast_(list(model.state_dict().values()))  # identical start on every rank, whatever the init
        torch.manual_seed(train_cfg.seed + 1000003 * dist.rank)  # each rank its own augmentation draws
        np.random.seed(train_cfg.seed + 1000003 * dist.rank)
    return model, fit_samples, val_samples


def _feature_sources(model: FastFlow, fit_samples: list[Sample], val_samples: list[Sample], train_cfg: TrainConfig,
                     dist: Dist, precision: str, decoded: DecodedImages | None
                     ) -> tuple[FeatureSource, FeatureSource | None]:
    """This rank's training and validation features: cached once unless augmentation (or the config) says no;
    validation features always cached (no augmentation); None for no validation images."""
    pre = preprocess_for(model)

    def shard(items: list[Sample], augment: bool = False) -> AnomalyDataset | None:
        mine = dist.owned(items)
        return AnomalyDataset(mine, pre, augment=augment, decoded=decoded) if mine else None

    cache = train_cfg.cache_features and not train_cfg.augment
    fit = FeatureSource(model, shard(fit_samples, train_cfg.augment), cache, train_cfg.batch_size,
                        len(fit_samples), dist, precision)
    val = FeatureSource(model, shard(val_samples), True, train_cfg.batch_size, len(val_samples),
                        dist, precision) if val_samples else None
    return fit, val


@dataclass
class _Loop:
    """What the steps of one training run share: the model and its optimiser, the data, the history, and
    the best epoch so far (``epoch`` counted from 0; -1 and no ``state`` before any epoch)."""

    model: FastFlow
    params: list[torch.nn.Parameter]  # the trainable ones, which ``opt`` updates
    opt: torch.optim.Optimizer
    fit: FeatureSource
    val: FeatureSource | None
    train_cfg: TrainConfig
    weights: str
    dist: Dist
    amp: Callable[[], contextlib.AbstractContextManager]  # the forward passes' autocast context
    scaler: torch.amp.GradScaler
    ckpt_path: str  # the last epoch's full training state, for --resume
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    # per flow: the kept epoch (-1: none yet) and its held-out NLL; ``state`` holds each flow's kept parameters
    best: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.best = self.best or {"epochs": [-1] * len(self.model.flows), "val_nlls": [math.inf] * len(self.model.flows),
                                  "state": None}

    @property
    def best_epoch(self) -> int:
        """The latest epoch any flow kept (counted from 0)."""
        return max(self.best["epochs"])

    @property
    def best_val_nll(self) -> float | None:
        """The kept model's held-out NLL (the flows' kept NLLs summed); None without validation images."""
        total = sum(self.best["val_nlls"])
        return None if math.isinf(total) else total

    @classmethod
    def start(cls, model: FastFlow, fit: FeatureSource, val: FeatureSource | None, train_cfg: TrainConfig,
              weights: str, dist: Dist, precision: str, ckpt_path: str) -> _Loop:
        params = model.trainable_parameters()
        # fused: one kernel for the whole update instead of a dozen per parameter list (bench/README.md)
        opt = torch.optim.Adam(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                               fused=dist.device.type in ("cpu", "cuda"))
        return cls(model, params, opt, fit, val, train_cfg, weights, dist, lambda: autocast(dist.device, precision),
                   grad_scaler(dist.device, precision), ckpt_path)


def _remove_partial_saves(run_dir: str, dist: Dist) -> None:
    """Delete the temporary files a run killed while saving left behind (save_atomic)."""
    for name in os.listdir(run_dir) if dist.is_main else []:
        if name.startswith(".tmp-") and name.endswith(".pt"):
            os.unlink(os.path.join(run_dir, name))


def checkpoint_matches(state: dict, model_cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
    """Whether a training checkpoint was written with these configs, its length aside (a longer ``epochs`` or
    ``steps`` extends a run). Its training config is read as this version reads it (``config.from_dict``: fields
    an older version saved and this one retired are dropped, fields added since take their defaults)."""
    try:
        saved = to_dict(from_dict(TrainConfig, state.get("train_config") or {}))
    except (TypeError, ValueError):
        return False
    # its length, and what is done after the epochs (auto.py's probes skip the map and score choices)
    after = {"epochs": train_cfg.epochs, "steps": train_cfg.steps, "choose_score": train_cfg.choose_score,
             "choose_map": train_cfg.choose_map, "border_correction": train_cfg.border_correction}
    return state.get("model_config") == to_dict(model_cfg) and {**saved, **after} == to_dict(train_cfg)


def _resume(loop: _Loop, model_cfg: ModelConfig, run_dir: str, epochs: int, log) -> None:
    """Continue from the run's ``checkpoint.pt`` (model, optimiser, history, best epoch, random state), which
    must have been written with the same configs (a longer ``epochs``/``steps`` extends the run)."""
    ckpt_path, train_cfg, dist = loop.ckpt_path, loop.train_cfg, loop.dist
    if not os.path.isfile(ckpt_path):
        log(f"no checkpoint in {run_dir} yet (stopped during the first epoch): starting from epoch 1")
        return
    state = load_safe(ckpt_path)
    if not checkpoint_matches(state, model_cfg, train_cfg):
        raise CheckpointError(f"{ckpt_path}: its config differs from this run's; resume with the same "
                              f"options, or start a new run folder")
    try:
        loop.model.load_state_dict(state["state"], strict=False)
        loop.opt.load_state_dict(state["optimizer"])
        loop.start_epoch, loop.history = state["epoch"] + 1, json.loads(state["history"])
        if "best_epochs" in state:
            loop.best = {"epochs": state["best_epochs"], "val_nlls": state["best_val_nlls"], "state": state["best_state"]}
        else:  # a checkpoint from before the per-flow choice: its one epoch for every flow
            n_flows = len(loop.model.flows)
            loop.best = {"epochs": [state["best_epoch"]] * n_flows,
                         "val_nlls": [state["best_val_nll"] / n_flows] * n_flows, "state": state["best_state"]}
        rng = state.get("rng_states", [state["rng_state"]])
        torch.set_rng_state(rng[dist.rank] if len(rng) == dist.world else rng[0])  # augmentation draws
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{ckpt_path} is not a complete training checkpoint ({type(e).__name__}: {e}); "
                              f"start a new run folder") from e
    log(f"resuming {run_dir} at epoch {loop.start_epoch + 1}/{epochs}")


def _run_epochs(loop: _Loop, epochs: int, progress: bool, save_every_epoch: bool = True) -> None:
    """Epochs ``loop.start_epoch`` to ``epochs``: train, validate, keep the best (or the last, ``keep_epoch``),
    save the training state (after the last epoch only, without ``save_every_epoch``)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=loop.start_epoch, desc="train", unit="epoch", dynamic_ncols=True)
    for epoch in range(loop.start_epoch, epochs):
        t0 = time.perf_counter()
        train_nll = _train_epoch(loop, epoch)
        row = {"epoch": epoch + 1, "train_nll": train_nll, "seconds": time.perf_counter() - t0}
        if loop.val is not None:
            with loop.amp():
                levels = _mean_nll(loop.model, loop.val)
            row["val_nll"], row["val_nll_levels"] = sum(levels), levels
            _keep(loop, epoch, [_keeps(loop, row, i) for i in range(len(levels))], levels)
        else:
            _keep(loop, epoch, [True] * len(loop.model.flows), [math.inf] * len(loop.model.flows))
        loop.history.append(row)
        if save_every_epoch or epoch + 1 == epochs:
            _save_training_state(loop, epoch)
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("nll")})
            bar.update(1)
    if bar is not None:
        bar.close()


def _keeps(loop: _Loop, row: dict, level: int) -> bool:
    """Whether flow ``level`` keeps the epoch of ``row``: its held-out NLL is the lowest so far ("best"), or
    (``keep_epoch="last"``) finite and within ``keep_last_within`` of the lowest so far."""
    nll = row["val_nll_levels"][level]
    if loop.train_cfg.keep_epoch != "last":
        return nll < loop.best["val_nlls"][level]
    seen = [h["val_nll_levels"][level] for h in loop.history + [row] if "val_nll_levels" in h]
    return math.isfinite(nll) and nll <= min(v for v in seen if math.isfinite(v)) + loop.train_cfg.keep_last_within


def _keep(loop: _Loop, epoch: int, keeps: list[bool], nlls: list[float]) -> None:
    """Take this epoch's parameters for the flows in ``keeps`` (with their norms) into ``loop.best``."""
    if not any(keeps):
        return
    state, best = trainable_state(loop.model), loop.best
    if best["state"] is None:
        best["state"] = state
    for key, value in state.items():
        level = _level_of(key)
        if level is None or keeps[level]:
            best["state"][key] = value
    for i, keep in enumerate(keeps):
        if keep:
            best["epochs"][i], best["val_nlls"][i] = epoch, nlls[i]


def _level_of(key: str) -> int | None:
    """The level of a trainable state entry (``flows.I.*``, ``norms.I.*``); None for any other entry."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] in ("flows", "norms") else None


def _train_epoch(loop: _Loop, epoch: int) -> float:
    """One epoch of optimiser steps; returns the mean training NLL (nats per dimension) over its images."""
    model, opt, scaler, dist, cfg = loop.model, loop.opt, loop.scaler, loop.dist, loop.train_cfg
    params = loop.params
    model.train()
    total, count = 0.0, 0
    for step, (feats, n_batch) in enumerate(loop.fit.steps(epoch, cfg.seed, noise=cfg.feature_noise)):
        opt.zero_grad(set_to_none=True)
        if dist.world > 1:
            finite, nll_sum = _sharded_backward(model, feats, n_batch, params, dist, loop.amp, scaler)
        else:
            with loop.amp():
                out = model.forward_features(feats, with_map=False)
            finite, nll_sum = bool(torch.isfinite(out.loss)), out.nll_per_dim.item() * n_batch
        if not finite:
            raise TrainingError(
                f"non-finite loss at epoch {epoch + 1}, step {step + 1}; the last good checkpoint is "
                f"{loop.ckpt_path}. Lower the learning rate (--lr) or clip the gradient (--grad-clip 1)")
        if dist.world == 1:
            scaler.scale(out.loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip * _per_image_dims(model))
        scaler.step(opt)
        scaler.update()
        total += nll_sum
        count += n_batch
    return total / count


def _save_training_state(loop: _Loop, epoch: int) -> None:
    """``checkpoint.pt``: everything ``--resume`` needs after ``epoch`` (every rank's random state, sharded)."""
    dist, best = loop.dist, loop.best
    extra = {"rng_states": dist.gather_objects(torch.get_rng_state())} if dist.world > 1 else {}
    if dist.is_main:
        save_atomic(build_checkpoint(loop.model, loop.train_cfg, loop.weights, None, {
            "epoch": epoch, "optimizer": loop.opt.state_dict(), "history": json.dumps(loop.history),
            "best_epochs": best["epochs"], "best_val_nlls": best["val_nlls"], "best_state": best["state"],
            "rng_state": torch.get_rng_state(), **extra,
        }), loop.ckpt_path)


def _select_best(loop: _Loop, log, val_samples: list[Sample]) -> dict:
    """Load each flow's kept epoch into the model; then, on synthetic defects pasted on the held-out images,
    with ``choose_map`` choose which levels make its anomaly map (auto.choose_map) and with ``choose_score``
    where its image score comes from (auto.choose_score); none with fewer than two held-out images. Returns their
    reports: {"map_choice", "score_choice"}, each present only when a choice was made."""
    if min(loop.best["epochs"]) < 0:  # a flow's validation NLL was NaN at every epoch: nothing can be selected
        last = loop.history[-1].get("val_nll") if loop.history else None
        raise TrainingError(
            f"the validation NLL was not finite at any epoch (last: {last}), "
            f"so no epoch can be selected; the last epoch's state is in {loop.ckpt_path}. Lower the learning rate "
            f"(--lr), clip the gradient (--grad-clip 1), or check the training images for corrupt ones")
    loop.model.load_state_dict(loop.best["state"], strict=False)
    from .auto import choice_set, choose_map, choose_score  # auto.py trains probes with this module

    model, cfg, choices = loop.model, loop.train_cfg, {}
    # the synthetic set is built only when a choice can be made: more than one level, or a score with its own levels
    can_choose = ((cfg.choose_map and len(model.level_ids) > 1)
                  or (cfg.choose_score and model.score_index != model.map_index))
    if can_choose and len(val_samples) >= 2:  # fewer: nothing to score on
        synthetic = choice_set(val_samples, cfg.seed, model)  # one set for both choices
        with loop.amp():
            if cfg.choose_map:
                choices["map_choice"] = choose_map(model, synthetic, log, cfg.border_correction)
            if cfg.choose_score:
                choices["score_choice"] = choose_score(model, synthetic, log)
    return {k: v for k, v in choices.items() if v is not None}


def _calibrate(loop: _Loop, run_dir: str, log) -> dict:
    """The selected model's decision threshold, calibrated on the held-out images."""
    with loop.amp():
        threshold = calibrate_threshold(loop.model, loop.val, loop.train_cfg.false_alarm_rate, _posed(loop))
    if threshold.get("warning"):
        log(f"warning: {threshold['warning'].replace('RUN_DIR', run_dir)}")
    return threshold


def _write_run(loop: _Loop, threshold: dict, choices: dict, run_dir: str, n_fit: int, n_val: int,
               timings: dict) -> None:
    """``model.pt`` (the selected model with its threshold and ``choices``: map and score, _select_best) and
    ``history.json`` (with ``timings``: feature cache and training seconds, whether features were cached), written
    by rank 0."""
    dist, best = loop.dist, loop.best
    ranks = {}
    if dist.world > 1:  # what each rank held: its share of the images (and of the feature cache)
        fit = loop.fit
        ranks = {"world_size": dist.world, "images_per_rank": dist.gather_objects(len(fit.dataset) if fit.dataset else 0)}
    if dist.is_main:
        save_atomic(build_checkpoint(loop.model, loop.train_cfg, loop.weights, threshold, {
            "best_epoch": loop.best_epoch + 1, "best_val_nll": loop.best_val_nll,
            "kept_epochs": [e + 1 for e in best["epochs"]], "n_fit": n_fit, "n_val": n_val,
            **choices,
        }), os.path.join(run_dir, "model.pt"))
        with open(os.path.join(run_dir, "history.json"), "w") as f:
            json.dump({"history": loop.history, **timings, "best_epoch": loop.best_epoch + 1,
                       "kept_epochs": [e + 1 for e in best["epochs"]], **ranks}, f, indent=1)


def _sharded_backward(model: FastFlow, feats: list[torch.Tensor] | None, n_batch: int,
                      params: list[torch.nn.Parameter], dist: Dist, amp=contextlib.nullcontext,
                      scaler: torch.amp.GradScaler | None = None) -> tuple[bool, float]:
    """Leave in each ``p.grad`` the gradient of the global batch's mean loss, from this rank's share
    ``feats`` (None: none of this batch) and the other ranks'. Returns (loss finite, summed nll_per_dim
    over the batch's images), the same on every rank."""
    loss_sum, nll_sum = 0.0, 0.0
    if feats is not None:
        with amp():
            out = model.forward_features(feats, with_map=False)
        k = feats[0].shape[0]
        loss = out.loss * (k / n_batch)  # sum of this rank's per-image NLLs / global batch size
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum, nll_sum = out.loss.item() * k, out.nll_per_dim.item() * k
    loss_sum, nll_sum = dist.sum_gradients(params, [loss_sum, nll_sum])
    return math.isfinite(loss_sum), nll_sum


def _per_image_dims(model: FastFlow) -> float:
    """grad_clip is given per feature dimension; the loss is a per-image sum, so scale the clip norm."""
    return float(sum(c * h * w for c, h, w in model.feature_shapes))


def calibrate_threshold(model: FastFlow, val: FeatureSource | None, false_alarm_rate: float,
                        posed: FeatureSource | None = None) -> dict:
    """Decision threshold from held-out normal images only (and ``posed`` copies of them), at the requested
    false-alarm rate."""
    if val is None:
        return {"value": math.inf, "false_alarm_rate": false_alarm_rate, "n_val": 0,
                "note": "no validation images: set --threshold when predicting"}
    from .calibrate import threshold_from_scores

    scores, what = _scores(model, val), "held-out training images"
    if posed is not None:
        scores = np.concatenate([scores, _scores(model, posed)])
        what += f" and {POSE_COPIES} posed copies of each (--augment pose)"
    # says when the held-out images are too few for the rate (reachable, n_needed, warning)
    return threshold_from_scores(scores, false_alarm_rate, what)


POSE_COPIES = 4  # posed copies of each held-out image the threshold of an --augment pose run also covers


def _posed(loop: _Loop) -> FeatureSource | None:
    """Trained with ``--augment pose`` (in one process): ``POSE_COPIES`` randomly posed copies of each held-out
    image (the ranges of data/augment.py), so the threshold covers the poses the model was trained to accept,
    not only the held-out images' own (bench/README.md, ninth round). None otherwise."""
    val = loop.val
    if val is None or val.dataset is None or loop.train_cfg.augment != "pose" or loop.dist.world > 1:
        return None
    from .misalign import MisalignedDataset

    posed = MisalignedDataset(val.dataset, POSE_COPIES, seed=loop.train_cfg.seed + 1)  # the test draws use seed 0
    return FeatureSource(loop.model, posed, True, loop.train_cfg.batch_size, dist=loop.dist, precision=val.precision)
