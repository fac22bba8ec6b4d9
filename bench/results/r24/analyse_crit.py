"""Twenty-fourth round: the map choice by synthetic AUPRO (today) or by the mean of synthetic AUPRO and pixel AUROC,
replayed on crit.py's output (margin 0.01 over the preset's map; the small stride-32 weights left out)."""
import json, glob
import numpy as np
M = 0.01
out = {"aupro": [], "mean": []}
for f in sorted(glob.glob("bench/results/r24/c_*.json")):
    d = json.load(open(f)); run = f.split("/")[-1][2:-5]
    maps = {k: v for k, v in d["maps"].items() if all(x in ("0", "1", "2", "3") for x in k.split(":"))}
    L = len(next(iter(maps)).split(":"))
    p = "1:1:0" if run.startswith(("mtd", "grass_seed0", "wide_seed2")) else ":".join(["1"] * L)
    line = f"{run:13s} preset {p}"
    for crit, fn in (("aupro", lambda v: v["syn_aupro"]), ("mean", lambda v: (v["syn_aupro"] + v["syn_pix"]) / 2)):
        best = max(maps, key=lambda k: fn(maps[k]))
        ch = best if fn(maps[best]) > fn(maps[p]) + M else p
        out[crit].append((maps[ch]["test_aupro"], maps[ch]["test_pix"]))
        line += f" | {crit}: {ch} {maps[ch]['test_aupro']:.3f}/{maps[ch]['test_pix']:.3f}"
    print(line)
for k, v in out.items(): print(k, np.mean(v, 0).round(4))
