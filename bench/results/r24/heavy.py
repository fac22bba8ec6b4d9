"""Twenty-fourth round. The map choice's candidates with the second-finest level weighted 2-16x, per run."""
import json, sys
import numpy as np
from fastflow.auto import level_maps, map_candidates, weighted_map
from fastflow.metrics import pixel_aupro, pixel_auroc
from common import run_sets  # beside this script

run, fmt, root, cat, out = sys.argv[1:6]
model, synthetic, truth, timgs, tmask = run_sets(run, fmt, root, cat)
syn, test = level_maps(model, synthetic), level_maps(model, timgs)
base = map_candidates(model)
two = [c for c in base if sum(1 for x in c if x) == 2 and max(c) == 1.0][0]  # the two finest, equal
lv = [i for i, x in enumerate(two) if x]
cands = list(base)
for k in (5.0, 8.0, 16.0):
    c = list(two); c[lv[1]] = k; cands.append(tuple(c))
# the second-finest alone, for reference
c = [0.0] * len(two); c[lv[1]] = 1.0; cands.append(tuple(c))
res = {"run": run, "maps": {}}
for c in cands:
    name = ":".join(f"{x:g}" for x in c)
    sm, tm = weighted_map(syn, c), weighted_map(test, c)
    r = {"syn": pixel_aupro(sm, truth), "test_aupro": pixel_aupro(tm, tmask), "test_pix": pixel_auroc(tm, tmask)}
    res["maps"][name] = {k: round(float(v), 4) for k, v in r.items()}
    print(name, res["maps"][name], flush=True)
json.dump(res, open(out, "w"), indent=1)
