"""Twenty-fourth round: the map choice with and without weighted candidates, simulated on weights.py's output
(bench/results/r24/w_*.json); each run's preset map from its run.json in the suite's work folder."""
import json, glob, sys
import numpy as np
M = 0.01
def preset_key(run, L):
    d = json.load(open(f"/tmp/fastflow-suite/runs/{run}/run.json"))
    ml = d["model_config"].get("map_levels"); lv = d["model_config"].get("levels")
    if ml is None: return ":".join(["1"] * L)
    # order finest-first == level order ascending
    lv = sorted(lv); return ":".join("1" if l in ml else "0" for l in lv)
rules = {
 "subsets": lambda k: all(c in "01" for c in k.split(":")) and k.split(":")[0] == "1" and "01" not in "".join(k.split(":")),
 "+1:k:0": lambda k: (all(c in "01" for c in k.split(":")) and k.split(":")[0] == "1" and "01" not in "".join(k.split(":"))) or (k.split(":")[0] == "1" and len([c for c in k.split(":") if c != "0"]) == 2 and k.split(":")[1] != "0" and all(c == "0" for c in k.split(":")[2:])),
 "finest>0 all": lambda k: k.split(":")[0] == "1",
}
tot = {r: [] for r in rules}
for f in sorted(glob.glob("bench/results/r24/w_*.json")):
    d = json.load(open(f)); run = f.split("w_")[1][:-5]; maps = d["maps"]; L = len(d["strides"])
    p = preset_key(run, L)
    line = [f"{run:13s} preset {p} {maps[p]['syn']:.3f} {maps[p]['test_aupro']:.3f}/{maps[p]['test_pix']:.3f}"]
    for r, ok in rules.items():
        cands = [k for k in maps if ok(k)] + [p]
        best = max(cands, key=lambda k: maps[k]["syn"])
        ch = best if maps[best]["syn"] > maps[p]["syn"] + M else p
        tot[r].append((maps[ch]["test_aupro"], maps[ch]["test_pix"]))
        line.append(f"| {r}: {ch} {maps[ch]['test_aupro']:.3f}/{maps[ch]['test_pix']:.3f}")
    print(" ".join(line))
for r, v in tot.items():
    print(r, np.mean(v, 0).round(4))
