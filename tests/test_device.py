"""Devices, precision and threads (device.py) through the API and every CLI verb, on the CPU.

The GPU paths themselves need a GPU (bench/gpu.py runs them); here: resolving and refusing devices,
``--device cpu`` end to end through each verb, the precision option's rules, bf16 autocast on the
CPU (the same code path as on a GPU), checkpoints as CPU tensors, and the thread defaults.
"""

import json
import os
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch

import fastflow.demo
from fastflow.cli import main
from fastflow.config import ModelConfig, TrainConfig
from fastflow.data import load_samples
from fastflow.device import (DeviceError, available_cpus, check_precision, default_threads, fits_in_memory,
                             resolve_device, set_threads, to_cpu)
from fastflow.evaluate import evaluate_model
from fastflow.run import load_run
from fastflow.predict import Predictor, onnx_providers
from fastflow.train import train

TINY = ["--input-size", "64", "--epochs", "1", "--batch-size", "4", "--quiet"]
NO_CUDA = "device cuda:7 is not available: this machine has no CUDA GPU (torch.cuda.is_available() is False); " \
          "use --device cpu or auto"


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA or MPS, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# -- resolving ------------------------------------------------------------------------------------
def test_auto_falls_back_to_the_cpu_without_a_gpu(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")


def test_auto_takes_the_first_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"^device cuda:7 is not available: this machine has 2 CUDA GPU\(s\) "
                                          r"\(cuda:0 to cuda:1\); use --device cuda:0 or auto$"):
        resolve_device("cuda:7")


def test_a_missing_device_is_a_one_line_error(no_gpu):
    with pytest.raises(DeviceError) as e:
        resolve_device("cuda:7")
    assert str(e.value) == NO_CUDA
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="MPS needs an Apple GPU"):
        resolve_device("mps")
    with pytest.raises(DeviceError, match=r"unknown device 'gpu': use one of auto, cpu, cuda, cuda:N, mps"):
        resolve_device("gpu")


def test_precision_rules():
    cpu = torch.device("cpu")
    assert check_precision("fp32", cpu) is None and check_precision("bf16", cpu) is torch.bfloat16
    assert check_precision("fp16", torch.device("cuda", 0)) is torch.float16
    with pytest.raises(DeviceError, match="fp16 is not supported on the CPU"):
        check_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="unknown precision 'int8': use one of fp32, bf16, fp16"):
        check_precision("int8", cpu)


def test_cache_placement_follows_free_gpu_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))  # 8 GiB free
    gpu = torch.device("cuda", 0)
    assert fits_in_memory(3 << 30, gpu) and not fits_in_memory(5 << 30, gpu)  # at most half the free memory
    assert fits_in_memory(1 << 50, torch.device("cpu"))  # the host is the fallback


def test_checkpoint_tensors_are_written_as_cpu_tensors():
    nested = {"a": torch.ones(2), "b": [torch.zeros(1), {"c": torch.arange(3)}], "d": (torch.ones(1), 3), "e": "x"}
    out = to_cpu(nested)
    assert out["e"] == "x" and out["d"][1] == 3 and torch.equal(out["b"][1]["c"], torch.arange(3))
    # A meta tensor stands in for a GPU one: to_cpu must at least try to move every tensor it holds.
    with pytest.raises(NotImplementedError):
        to_cpu({"state": {"w": torch.empty(2, device="meta")}})


def test_onnx_runtime_falls_back_to_the_cpu_with_a_warning():
    pytest.importorskip("onnxruntime")
    assert onnx_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert onnx_providers(torch.device("cuda", 0))[0][0] == "CUDAExecutionProvider"
    else:
        with pytest.warns(RuntimeWarning, match="ONNX Runtime runs on the CPU: device cuda:0 asked for"):
            assert onnx_providers(torch.device("cuda", 0)) == ["CPUExecutionProvider"]
        assert onnx_providers(torch.device("cuda", 0), warn=False) == ["CPUExecutionProvider"]


# -- threads ----------------------------------------------------------------------------------------
def test_thread_defaults_stay_within_this_process_cpus(monkeypatch):
    assert 1 <= default_threads() <= available_cpus() <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == 1  # an explicit OMP_NUM_THREADS is respected
        with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_default_threads_count_only_idle_cpus(monkeypatch):
    import fastflow.device as device

    monkeypatch.setattr(device, "available_cpus", lambda: 4)
    for idle, want in ((None, 4), (0.0, 1), (0.4, 1), (1.6, 2), (3.9, 4), (7.0, 4)):
        monkeypatch.setattr(device, "idle_cpus", lambda seconds=0.2, idle=idle: idle)
        assert device.default_threads() == want, idle
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks on this machine share the idle CPUs
    assert device.default_threads() == 2
    monkeypatch.undo()
    idle = device.idle_cpus(0.05)  # the real measurement: a share of this process's CPUs
    assert idle is None or 0.0 <= idle <= available_cpus() + 1e-9


def _cli_env(argv: list[str], env: dict) -> list[str]:
    """OMP_WAIT_POLICY and whether torch was loaded, as the CLI leaves them when its command starts."""
    code = ("import os, sys\nimport fastflow.cli as cli\n"
            "cli._run = lambda args: print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules) or 0\n"
            f"cli.main({argv!r})")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()[-2:]


def test_cli_leaves_openmp_its_own_waits():
    # passive waits made every step ~2x slower on an idle machine; threads follow the load instead (device.py)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    train = ["train", "--data", "d", "--category", "c", "--output", "o"]
    assert _cli_env(train, env) == ["None", "False"]
    assert _cli_env(["presets"], env) == ["None", "False"]
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # the user's own setting is theirs
    assert _cli_env(["presets"], env)[0] == "PASSIVE"


def test_thread_governor_follows_the_other_processes_load(monkeypatch):
    import fastflow.device as device

    monkeypatch.setattr(device, "available_cpus", lambda: 2)
    ticks = device._TICKS
    # the clock, and (busy ticks of the CPUs, this process's ticks) when measured: each second, others use
    # the CPUs given; the call at 0.5 s is too soon and must not measure (no sample for it)
    times = iter([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    samples = iter([(0, 0), (2 * ticks, 2 * ticks), (4 * ticks, 3 * ticks), (5.7 * ticks, 4 * ticks),
                    (7 * ticks, 6 * ticks)])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = device.ThreadGovernor(limit=2, sample=lambda: next(samples), clock=lambda: next(times))
        seen = [gov() for _ in range(5)]
        # too soon to measure; alone (2 threads); a neighbour on one core (1); on 0.7 of one (1); gone (2)
        assert seen == [2, 2, 1, 1, 2] and torch.get_num_threads() == 2
        idle, clock = iter([(0, 0), (0, 0)]), iter([0.0, 1.0])
        gov = device.ThreadGovernor(limit=1, sample=lambda: next(idle), clock=lambda: next(clock))
        assert gov() == 1  # never above the limit
        assert device._cpu_ticks() is None or len(device._cpu_ticks()) == 2  # the real measurement reads
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        device.set_threads(None, adaptive=True)
        assert device._GOVERNOR is not None
        device.set_threads(1, adaptive=True)  # a fixed count: nothing follows the load
        assert device._GOVERNOR is None and device.follow_load() == 1
    finally:
        device._GOVERNOR = None
        torch.set_num_threads(before)


# -- every verb with --device cpu -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    data = str(root / "data")
    cat = fastflow.demo.make_demo_dataset(data, n_train=8, n_test_good=2, n_test_defect=2)
    run = str(root / "run")
    assert main(["train", "--data", data, "--category", cat, "--output", run, "--device", "cpu", "--threads", "1",
                 *TINY]) == 0
    image = os.path.join(data, cat, "test", "good", "000.png")
    return {"data": data, "cat": cat, "run": run, "image": image, "root": root}


def test_every_verb_runs_with_device_cpu(cpu_run, tmp_path, monkeypatch):
    r = cpu_run
    dev = ["--device", "cpu", "--threads", "1"]
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", r["run"], "--data", r["data"], "--category", r["cat"], "--output", str(metrics),
                 "--quiet", *dev]) == 0
    assert 0 <= json.loads(metrics.read_text())["image_auroc"] <= 1
    assert main(["predict", r["run"], r["image"], "--output", str(tmp_path / "pred"), "--quiet", *dev]) == 0
    assert json.loads((tmp_path / "pred" / "summary.json").read_text())["counts"]["ok"] == 1
    onnx = str(tmp_path / "m.onnx")
    assert main(["export", r["run"], "--output", onnx, *dev]) == 0
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["parity"]["torch_device"] == "cpu" and sidecar["parity"]["onnx_provider"] == "CPUExecutionProvider"
    assert main(["predict", r["run"], r["image"], "--output", str(tmp_path / "pred_onnx"), "--runtime", "onnx",
                 "--onnx", onnx, "--quiet", *dev]) == 0
    assert main(["invert", r["run"], r["image"], "--region", "30,30,80,80", "--output", str(tmp_path / "inv"),
                 *dev]) == 0
    assert os.listdir(tmp_path / "inv")
    monkeypatch.setattr(fastflow.demo, "make_demo_dataset",
                        partial(fastflow.demo.make_demo_dataset, n_train=8, n_test_good=2, n_test_defect=2))
    assert main(["demo", "--output", str(tmp_path / "demo"), "--epochs", "1", "--quiet", *dev]) == 0
    assert 0 <= json.loads((tmp_path / "demo" / "metrics.json").read_text())["image_auroc"] <= 1
    assert torch.get_num_threads() == 1  # --threads


@pytest.mark.parametrize("verb", ["train", "evaluate", "predict", "export", "invert", "demo"])
def test_every_verb_refuses_a_missing_gpu_in_one_line(verb, cpu_run, tmp_path, capsys, no_gpu):
    r = cpu_run
    args = {"train": ["--data", r["data"], "--category", r["cat"], "--output", str(tmp_path / "t"), *TINY],
            "evaluate": [r["run"], "--data", r["data"], "--category", r["cat"], "--quiet"],
            "predict": [r["run"], r["image"], "--output", str(tmp_path / "p"), "--quiet"],
            "export": [r["run"], "--output", str(tmp_path / "m.onnx")],
            "invert": [r["run"], r["image"], "--region", "0,0,10,10", "--output", str(tmp_path / "i")],
            "demo": ["--output", str(tmp_path / "d"), "--quiet"]}[verb]
    assert main([verb, *args, "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert err == f"fastflow {verb}: error: {NO_CUDA}\n"
    assert not (tmp_path / "t").exists() and not (tmp_path / "d").exists()  # refused before any work


def test_precision_option_is_validated(cpu_run, tmp_path, capsys):
    r = cpu_run
    assert main(["predict", r["run"], r["image"], "--output", str(tmp_path / "p"), "--device", "cpu",
                 "--precision", "fp16"]) == 2
    assert "precision fp16 is not supported on the CPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["demo", "--precision", "int8"])
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    assert main(["predict", r["run"], r["image"], "--output", str(tmp_path / "q"), "--runtime", "onnx",
                 "--precision", "bf16"]) == 2
    assert "the ONNX graph is float32" in capsys.readouterr().err


def test_bf16_autocast_trains_and_predicts_with_float32_results(cpu_run, tmp_path):
    """bf16 on the CPU runs the autocast path a GPU runs with bf16/fp16: loss, maps and checkpoint stay float32."""
    samples = load_samples("mvtec", cpu_run["data"], cpu_run["cat"], "train")
    res = train(ModelConfig(input_size=(64, 64)), TrainConfig(epochs=1, batch_size=4, val_fraction=0.3), samples,
                str(tmp_path / "bf16"), progress=False, log=lambda *a: None, device="cpu", precision="bf16")
    assert np.isfinite(res.history[0]["train_nll"]) and np.isfinite(res.threshold)
    model, ckpt = load_run(str(tmp_path / "bf16"))
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for k, v in ckpt["state"].items()
               if v.is_floating_point())
    predictor = Predictor.from_run(str(tmp_path / "bf16"), device="cpu", precision="bf16")
    fp32 = Predictor.from_run(str(tmp_path / "bf16"), device="cpu")
    image = np.asarray(__import__("PIL.Image").Image.open(cpu_run["image"]).convert("RGB"))
    a, b = predictor.predict(image), fp32.predict(image)
    assert a.anomaly_map.dtype == np.float32 and a.anomaly_map.shape == b.anomaly_map.shape
    # bf16 has 8 bits of mantissa: the same map to a few percent of its range, not bit for bit
    span = float(b.anomaly_map.max() - b.anomaly_map.min())
    assert np.abs(a.anomaly_map - b.anomaly_map).max() < 0.1 * span + 0.05 and a.score != b.score
    metrics, _ = evaluate_model(model, load_samples("mvtec", cpu_run["data"], cpu_run["cat"], "test"),
                                predictor.preprocess, 4, device="cpu", precision="bf16")
    assert 0 <= metrics["image_auroc"] <= 1


def test_torchrun_device_choice(monkeypatch, no_gpu):
    from fastflow.distributed import init_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    with pytest.raises(ValueError, match=r"--device cuda:1 under torchrun: use auto, cuda"):
        init_from_env(device="cuda:1")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        init_from_env(device="cuda")


def test_autocast_through_the_gpu_convolution_route(monkeypatch):
    """The flows' inference path on a GPU runs F.conv2d (the oneDNN fused kernel is CPU float32 only): forced
    here under bf16 autocast, the outputs stay float32 and close to fp32 (bf16: ~3 significant digits)."""
    import fastflow.fused as fused
    from fastflow.flow import use_fast_backward
    from fastflow.model import FastFlow

    monkeypatch.setattr(fused, "onednn_conv_relu_ok", lambda: False)
    torch.manual_seed(0)
    model = FastFlow(ModelConfig(input_size=(64, 64)), weights="random").eval()
    with torch.no_grad():
        for p in model.flows.parameters():
            p.normal_(0, 0.02)  # not an identity flow
    x = torch.randn(2, 3, 64, 64)
    frozen = fused.for_inference(model)  # the inference form, as predict and evaluate run it
    with torch.inference_mode():
        ref = frozen(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = frozen(x)
    assert out.anomaly_map.dtype == torch.float32 and out.score.dtype == torch.float32
    rel = float((out.anomaly_map - ref.anomaly_map).abs().max() / ref.anomaly_map.abs().max())
    assert 0 < rel < 0.02  # not bit-identical (autocast did run in bf16), within bf16's rounding
    model = use_fast_backward(model).train()  # the training form, as train() runs it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_out = model.forward_features(model.extract(x), with_map=False)
    assert train_out.loss.dtype == torch.float32
    train_out.loss.backward()
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
