"""Twenty-ninth round: choice rules for the anomaly map, compared on map_replay.py's figures (no training). A rule scores
every candidate map on the held-out synthetic defects; the best replaces the preset's map when it leads by more than
the margin (0.01, auto.MARGIN); then the border correction is made when it lifts the chosen map's synthetic AUPRO by
more than the margin (as auto.choose_map does; a guarded rule also asks it not to lower the synthetic pixel AUROC by
more than its tolerance). Prints, per run, the map each rule takes and its test AUPRO / pixel AUROC, then means over
the small-set runs and the suite's. Usage: python bench/results/r29/map_rules.py OUT.json REPLAY.json [...]
"""
import json, re, sys

MARGIN = 0.01


def rule(score: str, tol: float | None):
    """score "aupro" or "mean" (of AUPRO and pixel AUROC); tol: a candidate (or a border correction) whose synthetic
    pixel AUROC is more than this below the preset's (the uncorrected map's) is not taken; None: no guard."""
    def value(c):
        return c["syn_aupro"] if score == "aupro" else (c["syn_aupro"] + c["syn_pixel_auroc"]) / 2

    def allowed(c, ref):
        return tol is None or c["syn_pixel_auroc"] >= ref["syn_pixel_auroc"] - tol

    def choose(cands: dict) -> tuple[str, bool, dict]:
        preset_name = next(n for n, c in cands.items() if c["preset"])
        preset = cands[preset_name]
        ok = [n for n in cands if allowed(cands[n], preset)]
        best = max(ok, key=lambda n: value(cands[n]))
        pick = best if value(cands[best]) > value(preset) + MARGIN else preset_name
        c = cands[pick]
        border = c["border"]["syn_aupro"] > c["syn_aupro"] + MARGIN and allowed(c["border"], c)
        return pick, border, (c["border"] if border else c)
    return choose


RULES = {"shipped (AUPRO)": rule("aupro", None), "AUPRO, pixel within 0.01": rule("aupro", 0.01),
         "AUPRO, pixel within 0.005": rule("aupro", 0.005), "mean": rule("mean", None),
         "mean, pixel within 0.01": rule("mean", 0.01)}
SHIPPED = "shipped (AUPRO)"

out = {}
for path in sys.argv[2:]:
    r = json.load(open(path))
    name = path.rsplit("/", 1)[-1].removesuffix(".json")
    out[name] = {"chosen_in_run": r["chosen_in_run"]}
    for rname, choose in RULES.items():
        pick, border, c = choose(r["candidates"])
        out[name][rname] = {"map": pick, "border": border, "test_aupro": c["test_aupro"],
                            "test_pixel_auroc": c["test_pixel_auroc"]}
    print(name, " | ".join(f"{k}: {v['map']}{' +border' if v['border'] else ''} {v['test_aupro']:.3f}/"
                           f"{v['test_pixel_auroc']:.3f}" for k, v in out[name].items() if k in RULES))
json.dump(out, open(sys.argv[1], "w"), indent=1)
small = [n for n in out if not re.search(r"_seed\d$", n)]  # the suite's runs are named CATEGORY_seedN
for group, names in {"small sets (40-60 images)": small, "suite (96+ images)": [n for n in out if n not in small]}.items():
    if not names:
        continue
    print(f"\n{group}: {len(names)} runs; means of test AUPRO / pixel AUROC; runs worse / better than the shipped rule "
          f"by more than 0.005, on AUPRO and on pixel AUROC")
    for rname in RULES:
        a = [out[n][rname]["test_aupro"] for n in names]
        p = [out[n][rname]["test_pixel_auroc"] for n in names]
        da = [out[n][rname]["test_aupro"] - out[n][SHIPPED]["test_aupro"] for n in names]
        dp = [out[n][rname]["test_pixel_auroc"] - out[n][SHIPPED]["test_pixel_auroc"] for n in names]
        print(f"  {rname}: {sum(a) / len(a):.4f} / {sum(p) / len(p):.4f}; AUPRO {sum(d < -0.005 for d in da)} worse, "
              f"{sum(d > 0.005 for d in da)} better; pixel {sum(d < -0.005 for d in dp)} worse, "
              f"{sum(d > 0.005 for d in dp)} better")
