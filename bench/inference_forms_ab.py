"""A/B of a source tree before and after issue 18's flow change: lite0 preset, 256 px, random images;
the flows + map at batch 1 and 8 and a full forward at batch 1 (what Predictor runs: before, the reference
model under inference_mode; after, fused.for_inference), and one training step at batch 8 on cached features.

    for src in /path/to/old/src /path/to/new/src; do PYTHONPATH=$src .venv/bin/python bench/inference_forms_ab.py; done
"""
import statistics
import time

import torch

torch.set_num_threads(2); torch.manual_seed(0)
from fastflow.config import get_preset
from fastflow.model import FastFlow
new = __import__("importlib").util.find_spec("fastflow.fused") is not None
cfg = get_preset("efficientnet_lite0").model
model = FastFlow(cfg, weights="pretrained").eval()
if new:
    from fastflow.fused import for_inference
    from fastflow.flow import use_fast_backward
    inf = for_inference(model); use_fast_backward(model)
else:
    inf = model
def med(f, n, warm=3):
    for _ in range(warm): f()
    t = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(t), 2)
x1 = torch.randn(1, 3, 256, 256); x8 = torch.randn(8, 3, 256, 256)
with torch.inference_mode():
    f1 = model.extract(x1); f8 = model.extract(x8)
    r = {"flows+map b1 ms": med(lambda: inf.forward_features(f1, (256, 256)), 30),
         "flows+map b8 ms": med(lambda: inf.forward_features(f8, (256, 256)), 10),
         "full b1 ms": med(lambda: inf(x1), 10)}
f8 = [f.clone() for f in f8]
model.train()
params = model.trainable_parameters()
def step():
    out = model.forward_features(f8, with_map=False)
    out.loss.backward()
    for p in params: p.grad = None
r["train step b8 ms"] = med(step, 10)
print("new" if new else "main", r)
