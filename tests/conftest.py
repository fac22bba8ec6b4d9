"""Shared fixtures."""

import os

import pytest

from fastflow.config import ModelConfig, TrainConfig
from fastflow.data import load_samples
from fastflow.demo import make_demo_dataset
from fastflow.train import train


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[str, str]:
    """A 1-epoch 64x64 run on the synthetic texture set, trained once per session:
    (run_dir, category folder of the synthetic set)."""
    root = tmp_path_factory.mktemp("tiny_run")
    data, run_dir = str(root / "data"), str(root / "run")
    cat = make_demo_dataset(data, n_train=16, n_test_good=2, n_test_defect=2)
    train(ModelConfig(input_size=(64, 64)), TrainConfig(epochs=1, batch_size=8, val_fraction=0.3),
          load_samples("mvtec", data, cat, "train"), run_dir, progress=False, log=lambda *a: None)
    return run_dir, os.path.join(data, cat)
