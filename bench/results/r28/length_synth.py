"""Twenty-eighth round, a lead: would synthetic defects pasted on the held-out normal images (normal images only) have
told a 50-epoch run from the 200 epochs that 800 steps give a 40-image set? Scores trained runs with
auto.synthetic_score on 8 defects per held-out image (draw = the run's seed + 500, not the shipped choice's draw).
    PYTHONPATH=src python bench/results/r28/length_synth.py OUT.json RUN_DIR [RUN_DIR ...]
"""
import json, sys

from fastflow.auto import synthetic_score, synthetic_validation
from fastflow.data import load_samples
from fastflow.run import load_run
from fastflow.train import split_validation

out = {}
for run in sys.argv[2:]:
    info = json.load(open(f"{run}/run.json"))
    d, t = info["data"], info["train_config"]
    train = load_samples(d["format"], d["root"], d["category"], "train", **d.get("options", {}))
    _, val = split_validation(train, t["val_fraction"], t["seed"], t.get("val_min", 0))
    normals, bad, masks = synthetic_validation(val, t["seed"] + 500, per_image=8)
    model = load_run(run)[0].eval()
    s = synthetic_score(model, normals, bad, masks)
    out[run] = {"n_val": len(val), **{k: round(float(v), 4) for k, v in s.items()}}
    print(run, out[run], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
