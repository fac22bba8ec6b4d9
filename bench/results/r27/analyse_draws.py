"""Twenty-seventh round: the automatic choice under other criteria, replayed on choice_draws.py's figures
(results/r27/cd_*.json; each candidate's image AUROC, pixel AUROC and AUPRO on the same held-out synthetic defects).
Criteria: the former mean of image and pixel AUROC, and the mean of image AUROC and AUPRO (shipped since 5247cbd); each
picked by auto.pick (the first candidate within auto.MARGIN of the best). Prints, per row, the pick of each draw.
    PYTHONPATH=src python bench/results/r27/analyse_draws.py bench/results/r27/cd_*.json
"""
import json, sys

from fastflow.auto import CANDIDATES as CANDS, pick

SHORT = {"efficientnet_lite0": "L", "lite0_texture": "T", "lite0_unaligned_fine": "F"}
CRITERIA = {"img+pix (former)": lambda s: (s[0] + s[1]) / 2, "img+aupro (shipped)": lambda s: (s[0] + s[2]) / 2}

for path in sys.argv[1:]:
    r = json.load(open(path))
    if any(len(s) < 3 for d in r["draws"] for s in d["scores"].values()):
        continue  # an early file without AUPRO
    name = path.rsplit("/", 1)[-1][3:-5]
    out = []
    for crit, f in CRITERIA.items():
        picks = ["".join(SHORT[pick({n: f(d["scores"][n]) for n in CANDS})]
                         for d in r["draws"] if d["per_image"] == k) for k in (2, 8)]
        out.append(f"{crit}: {' '.join(picks)}")
    print(f"{name:16s} n_val {r['n_val']:3d}  " + "  |  ".join(out))
