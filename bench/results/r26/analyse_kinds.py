"""Twenty-sixth round: the map choice replayed on kinds_choice.py's output with several scores (pasted AUPRO, the other
kinds' AUPRO, mixes); margin 0.01 over the preset's map. Prints each run's choice and its test AUPRO on both rows."""
import glob, json
M = 0.01
RULES = {"pasted": lambda r: r["pasted"], "pooled": lambda r: r["both"],
         "mean": lambda r: (r["pasted"] + r["other"]) / 2, "pasted+0.25other": lambda r: (r["pasted"] + 0.25 * r["other"]) / 1.25}
files = sorted(glob.glob("bench/results/r26/kc_*_seed0.json"))
for name, f in RULES.items():
    line, tot = [], [0.0, 0.0]
    for path in files:
        d = json.load(open(path))
        maps = d["maps"]
        preset = json.load(open(d["run"] + "/run.json"))["preset"]
        cur = {"efficientnet_lite0": "1:1:1", "lite0_texture": "1:1", "lite0_unaligned_fine": "1:1:0"}[preset]
        rows = [k for k in maps[cur] if k not in ("pasted", "other", "both")]
        best = max(maps, key=lambda k: f(maps[k]))
        ch = best if f(maps[best]) > f(maps[cur]) + M else cur
        row = path.split("kc_")[1].replace("_seed0.json", "")
        line.append(f"{row}: {ch} ({maps[ch][rows[0]][1]:.3f} / {maps[ch][rows[1]][1]:.3f})")
        tot[0] += maps[ch][rows[0]][1]; tot[1] += maps[ch][rows[1]][1]
    print(f"{name:18s} mean test AUPRO pasted / other rows {tot[0] / len(files):.4f} / {tot[1] / len(files):.4f}\n   " + "\n   ".join(line))
