"""Twenty-fourth round: the map choice with the blur sigma among its choices, replayed on sigmas.py output."""
import json, glob
import numpy as np
M = 0.01
rows = {"today": [], "sigma": []}
for f in sorted(glob.glob("bench/results/r24/s_*.json")):
    d = json.load(open(f)); run = f.split("/")[-1][2:-5]; maps = d["maps"]; base = d["sigma_preset"]
    w = json.load(open(f"bench/results/r24/w_{run}.json")) if glob.glob(f"bench/results/r24/w_{run}.json") else None
    pre = json.load(open(f"/tmp/fastflow-suite/runs_r24/{run}/run.json" if glob.glob(f"/tmp/fastflow-suite/runs_r24/{run}") else f"/tmp/fastflow-suite/runs/{run}/run.json"))["model_config"]
    L = len(next(iter(maps)).split("|")[1].split(":"))
    ml, lv = pre.get("map_levels"), sorted(pre.get("levels") or [1, 2, 3])
    p = ":".join("1" if (ml is None or l in ml) else "0" for l in lv)
    pk = f"{base:g}|{p}"
    def choose(keys):
        best = max(keys, key=lambda k: maps[k]["syn"])
        return best if maps[best]["syn"] > maps[pk]["syn"] + M else pk
    t = choose([k for k in maps if k.startswith(f"{base:g}|")]); s = choose(list(maps))
    rows["today"].append((maps[t]["test_aupro"], maps[t]["test_pix"])); rows["sigma"].append((maps[s]["test_aupro"], maps[s]["test_pix"]))
    print(f"{run:13s} sigma {base:g} today {t} {maps[t]['test_aupro']:.3f}/{maps[t]['test_pix']:.3f}  with sigma choice {s} {maps[s]['test_aupro']:.3f}/{maps[s]['test_pix']:.3f}")
for k, v in rows.items(): print(k, np.mean(v, 0).round(4))
