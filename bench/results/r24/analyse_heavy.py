"""Twenty-fourth round: the map choice with the second-finest level weighted up to 3x (shipped), 5x, 8x or 16x,
replayed on heavy.py's output (margin 0.01 over the preset's map)."""
import json, glob
import numpy as np
M = 0.01
sets = {"2,3": {"2", "3"}, "2,3,5": {"2", "3", "5"}, "2,3,5,8": {"2", "3", "5", "8"}, "2,3,5,8,16": {"2", "3", "5", "8", "16"}}
out = {k: [] for k in sets}
for f in sorted(glob.glob("bench/results/r24/h_*.json")):
    d = json.load(open(f)); run = f.split("/")[-1][2:-5]; maps = d["maps"]
    L = len(next(iter(maps)).split(":"))
    p = "1:1:0" if run.startswith(("mtd", "grass_seed0", "wide_seed2")) else ":".join(["1"] * L)
    line = f"{run:13s}"
    for name, allowed in sets.items():
        keys = [k for k in maps if k.split(":")[0] == "1" and all(x in {"0", "1"} | allowed for x in k.split(":"))]
        best = max(keys, key=lambda k: maps[k]["syn"])
        ch = best if maps[best]["syn"] > maps[p]["syn"] + M else p
        out[name].append((maps[ch]["test_aupro"], maps[ch]["test_pix"]))
        line += f" | {name}: {ch} {maps[ch]['test_aupro']:.3f}/{maps[ch]['test_pix']:.3f}"
    print(line)
for k, v in out.items(): print(k, np.mean(v, 0).round(4))
