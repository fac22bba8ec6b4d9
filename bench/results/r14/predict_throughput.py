"""Predictor.predict throughput on bottle's 83 test images, batch 16 (fourteenth round; run by predict_ab.sh)."""
import glob, sys, time, torch
from fastflow.predict import Predictor
run = sys.argv[1]
paths = sorted(glob.glob("/work/shared/data/mvtec_ad/bottle/test/*/*.png"))
p = Predictor.from_run(run)
p.predict(paths[:16], batch_size=16)
for label in ["as is", "threads 2 fixed"]:  # two passes in a row (the label names no real difference: no governor from Python)
    if label == "threads 2 fixed":
        import fastflow.device as D; D._GOVERNOR = None; torch.set_num_threads(2)
    t = time.perf_counter(); p.predict(paths, batch_size=16); dt = time.perf_counter() - t
    print(label, torch.get_num_threads(), f"{len(paths)/dt:.1f} img/s", flush=True)
