"""Twenty-fourth round. The map choice's candidates (+ the coarsest level at small weights) scored by synthetic AUPRO
and synthetic pixel AUROC, beside the test row's, per run."""
import json, sys
import numpy as np
from fastflow.auto import level_maps, map_candidates, weighted_map
from fastflow.metrics import pixel_aupro, pixel_auroc
from common import run_sets  # beside this script

run, fmt, root, cat, out = sys.argv[1:6]
model, synthetic, truth, timgs, tmask = run_sets(run, fmt, root, cat)
syn, test = level_maps(model, synthetic), level_maps(model, timgs)
cands = map_candidates(model)
if len(cands[0]) == 3:
    cands += [(1.0, 1.0, x) for x in (0.05, 0.1, 0.2, 0.4)]
res = {"run": run, "maps": {}}
for c in cands:
    name = ":".join(f"{x:g}" for x in c)
    sm, tm = weighted_map(syn, c), weighted_map(test, c)
    r = {"syn_aupro": pixel_aupro(sm, truth), "syn_pix": pixel_auroc(sm, truth),
         "test_aupro": pixel_aupro(tm, tmask), "test_pix": pixel_auroc(tm, tmask)}
    res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
    print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
