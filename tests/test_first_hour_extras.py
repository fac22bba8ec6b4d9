"""Smaller traps of issue 19's first hour, through ``fastflow.cli.main`` where they are CLI behaviour.

- A downloaded backbone on a machine without the network: one quick connection attempt, then a one-line
  error, or the weights an earlier download left in the Hugging Face cache; never a minute of retries. No
  test here touches the network: the connection attempt is replaced by one that fails.
- A training interrupted before its first checkpoint leaves no orphan run.json.
- scikit-image is needed by the demo only: the report's mask outlines do without it.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch

import fastflow.backbones as backbones
from fastflow.cli import main
from fastflow.demo import make_demo_dataset


@pytest.fixture
def offline(monkeypatch):
    """No route to the hub, no proxy, no HF_HUB_OFFLINE; returns the hosts a connection was tried to."""
    tried = []

    def refuse(address, timeout=None, *args, **kwargs):
        tried.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in (*backbones.PROXY_VARIABLES, "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    return tried


def test_train_with_a_downloaded_backbone_offline_fails_at_once(offline, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backbones, "cached_hub_weights", lambda name: None)  # nothing downloaded before
    make_demo_dataset(str(tmp_path / "data"), n_train=4, n_test_good=1, n_test_defect=1)
    start = time.perf_counter()
    rc = main(["train", "--data", str(tmp_path / "data"), "--category", "texture", "--output", str(tmp_path / "run"),
               "--backbone", "resnet18", "--input-size", "64", "--epochs", "1", "--quiet"])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "cannot reach huggingface.co:443" in err and "--weights PATH" in err and "efficientnet_lite0" in err
    assert offline == [(("huggingface.co", 443), 3.0)]  # one attempt, a short timeout
    assert seconds < 30  # was about 40-60 s of download retries; the rest is loading torch and the data
    assert not (tmp_path / "run" / "run.json").exists()


def test_offline_loads_the_weights_an_earlier_download_cached(offline, tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False)
    torch.nn.init.normal_(reference.conv1.weight)
    cached = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), str(cached))
    asked = []

    def cache(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(cached) if filename == "model.safetensors" else None

    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", cache)
    model = backbones._create_timm(backbones.get_spec("resnet18"), "pretrained")
    assert asked == [("timm/resnet18.a1_in1k", "model.safetensors")]
    assert torch.equal(model.conv1.weight, reference.conv1.weight)


def test_a_proxy_or_offline_mode_leaves_the_decision_to_huggingface_hub(offline, monkeypatch):
    assert backbones.hub_unreachable() is not None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    assert backbones.hub_unreachable() is None
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local:8080")
    assert "mirror.local:8080" in backbones.hub_unreachable() and offline[-1][0] == ("mirror.local", 8080)


def test_train_interrupted_before_its_first_checkpoint_leaves_no_run_json(tmp_path, capsys, monkeypatch):
    import fastflow.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastflow.train, "train", interrupted)
    make_demo_dataset(str(tmp_path / "data"), n_train=4, n_test_good=1, n_test_defect=1)
    args = ["train", "--data", str(tmp_path / "data"), "--category", "texture", "--output", str(tmp_path / "run"),
            "--backbone", "efficientnet_lite0", "--quiet"]
    assert main(args) == 130 and "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # a new run in the same folder is not refused as "already a run"



def test_mask_outlines_of_the_report_need_no_scikit_image(monkeypatch):
    import sys

    import numpy as np

    from fastflow.visualize import mask_overlay

    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage raises ImportError
    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    mask = np.zeros((6, 6), bool)
    mask[1:5, 1:5] = True
    red = (mask_overlay(np.zeros((6, 6, 3), np.uint8), mask) == [255, 0, 0]).all(axis=-1)
    assert red.sum() == 12 and not red[2:4, 2:4].any()
