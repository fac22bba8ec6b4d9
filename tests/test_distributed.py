"""Training on several processes (gloo on this CPU machine), launched the way users launch it:
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m fastflow train ...``.

1. One category sharded over 2 ranks gives the parameters of a single process with the same global
   batch and seed (to float32 tolerance), and each rank caches only its share of the images.
2. ``--category all`` with two categories on 2 ranks trains one whole category per rank and writes
   both run folders and one summary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastflow.cli import main as cli_main
from fastflow.config import ModelConfig, from_dict
from fastflow.demo import make_demo_dataset
from fastflow.model import FastFlow

TRAIN = ["--input-size", "64", "--epochs", "2", "--batch-size", "4", "--quiet"]
# Float32 tolerance: the two runs add the same per-image gradients in a different order (per rank,
# then across ranks), so gradients differ by float32 rounding; Adam divides each gradient by its own
# running scale, so these relative differences reach the parameters as a small fraction of lr (1e-3)
# per step. 4 steps: measured 2e-6; 2e-5 leaves room, while training moves parameters by ~4e-3.
# Both sides run 1 intra-op thread: the thread count alone changes float32 rounding too (1 vs 2
# threads in ONE process: 1e-4 on 3 of 824k weights whose gradient is at rounding level).
ATOL = 2e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """Two tiny MVTec-layout categories, texture_a and texture_b (8 training images each)."""
    root = tmp_path_factory.mktemp("dist")
    for name, seed in (("texture_a", 0), ("texture_b", 1)):
        make_demo_dataset(str(root / f"tmp-{name}"), n_train=8, n_test_good=2, n_test_defect=2, seed=seed)
        shutil.move(str(root / f"tmp-{name}" / "texture"), str(root / "data" / name))
    return str(root / "data")


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"  # 2 processes x 1 thread on a 2-core machine
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastflow", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def trainable_state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


def test_two_ranks_match_one_process(data, tmp_path):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1); see ATOL
    try:
        assert cli_main(["train", "--data", data, "--category", "texture_a", "--output", single, *TRAIN]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun("--data", data, "--category", "texture_a", "--output", sharded, *TRAIN)

    # 7 fit images (1 held out), global batch 4: 2 steps per epoch, 4 steps, after which we compare
    a = trainable_state(os.path.join(single, "checkpoint.pt"))
    b = trainable_state(os.path.join(sharded, "checkpoint.pt"))
    assert a.keys() == b.keys()
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert diff < ATOL, f"2-rank parameters differ from 1-process by {diff:.2e}"

    # the comparison can fail: training moved the parameters far more than the tolerance
    ckpt = torch.load(os.path.join(single, "checkpoint.pt"), map_location="cpu", weights_only=True)
    torch.manual_seed(0)  # train() seeds with TrainConfig.seed (0) before building the model
    init = FastFlow(from_dict(ModelConfig, ckpt["model_config"])).state_dict()
    moved = max((a[k].double() - init[k].double()).abs().max().item() for k in a)
    assert moved > 100 * ATOL, moved

    h1 = json.load(open(os.path.join(single, "history.json")))
    h2 = json.load(open(os.path.join(sharded, "history.json")))
    for r1, r2 in zip(h1["history"], h2["history"]):  # metrics gathered over both ranks
        assert r2["val_nll"] == pytest.approx(r1["val_nll"], rel=1e-5)
        assert r2["train_nll"] == pytest.approx(r1["train_nll"], rel=1e-5)
    assert h2["world_size"] == 2 and h2["images_per_rank"] == [4, 3]  # each rank cached only its share
    t1 = torch.load(os.path.join(single, "model.pt"), weights_only=True)["threshold"]
    t2 = torch.load(os.path.join(sharded, "model.pt"), weights_only=True)["threshold"]
    assert t2["n_val"] == t1["n_val"] and t2["value"] == pytest.approx(t1["value"], rel=1e-4)
    assert not [n for n in os.listdir(sharded) if n.startswith(".tmp-")]


def test_category_all_spreads_categories_over_ranks(data, tmp_path):
    out = str(tmp_path / "runs")
    proc = torchrun("--data", data, "--category", "all", "--output", out, *TRAIN)
    for cat in ("texture_a", "texture_b"):
        for name in ("model.pt", "checkpoint.pt", "history.json", "run.json"):
            assert os.path.isfile(os.path.join(out, cat, name)), (cat, name)
        assert "world_size" not in json.load(open(os.path.join(out, cat, "history.json")))  # trained alone
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert list(summary) == ["texture_a", "texture_b"]
    assert [summary[c]["train"]["ranks"] for c in summary] == [[0], [1]]  # one whole category per rank
    assert all(summary[c]["train"]["n_images"] == 8 for c in summary)
    assert "texture_b" in proc.stdout and "ranks" in proc.stdout  # rank 0 printed the table
