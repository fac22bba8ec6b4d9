"""Twenty-eighth round, a lead: would synthetic defects pasted on the held-out normal images (normal images only) have
told a 50-epoch run from the 200 epochs that 800 steps give a 40-image set? Scores trained runs with
auto.synthetic_score on 8 defects per held-out image (draw = the run's seed + 500, not the shipped choice's draw).
    PYTHONPATH=src python bench/results/r28/length_synth.py OUT.json RUN_DIR [RUN_DIR ...]
"""
import json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from fusion import load_held_out  # noqa: E402  (a run, its train config and its held-out samples)

from fastflow.auto import synthetic_score, synthetic_validation  # noqa: E402

out = {}
for run in sys.argv[2:]:
    model, _, _, tcfg, val = load_held_out(run)
    normals, bad, masks = synthetic_validation(val, tcfg.seed + 500, per_image=8)
    s = synthetic_score(model, normals, bad, masks)
    out[run] = {"n_val": len(val), **{k: round(float(v), 4) for k, v in s.items()}}
    print(run, out[run], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
