"""Twenty-fifth round: the map choice replayed on ring.py's output (bench/results/r25/r_*.json), with and without
border-corrected candidates; margin 0.01 over the preset's map (all levels; lite0_unaligned_fine: strides 8 + 16)."""
import glob, json
import numpy as np
M = 0.01
tot = {"today": [], "+ring": [], "then ring": []}
for f in sorted(glob.glob("bench/results/r25/r_*.json")):
    d = json.load(open(f)); maps = d["maps"]; run = f.split("r_")[1][:-5]
    L = len(d["now"].split(":"))
    preset = "1:1:0" if run.startswith(("mtd", "grass_seed0", "wide_seed2")) and L == 3 else ":".join(["1"] * L)
    line = f"{run:15s} preset {preset} syn {maps[preset]['syn']:.3f} test {maps[preset]['test_aupro']:.3f}/{maps[preset]['test_pix']:.3f}"
    for rule, ok in (("today", lambda k: "+ring" not in k), ("+ring", lambda k: True)):
        cands = [k for k in maps if ok(k)]
        best = max(cands, key=lambda k: maps[k]["syn"])
        ch = best if maps[best]["syn"] > maps[preset]["syn"] + M else preset
        tot[rule].append((maps[ch]["test_aupro"], maps[ch]["test_pix"]))
        line += f" | {rule}: {ch} syn {maps[ch]['syn']:.3f} test {maps[ch]['test_aupro']:.3f}/{maps[ch]['test_pix']:.3f}"
        if rule == "today":
            today = ch
    ring = today + "+ring"  # the chosen map, then its border correction when it leads by the margin
    ch = ring if maps[ring]["syn"] > maps[today]["syn"] + M else today
    tot["then ring"].append((maps[ch]["test_aupro"], maps[ch]["test_pix"]))
    line += f" | then ring: {ch} syn {maps[ch]['syn']:.3f} test {maps[ch]['test_aupro']:.3f}/{maps[ch]['test_pix']:.3f}"
    print(line)
for r, v in tot.items():
    print(r, np.mean(v, 0).round(4), len(v))
