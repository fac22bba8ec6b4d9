"""Twenty-ninth round: what auto.choose_length sees for two trained runs of one recipe, seed and held-out split (the
end of a 200-epoch run and a 50-epoch run, i.e. its state after epoch 50): the pixel AUROC of each one's map, with the
preset's map levels (as before the map choice), on the synthetic set that run's training builds (``choice_set`` with
the run's seed). Usage (repository root):
    PYTHONPATH=src python bench/results/r29/length_pairs.py OUT.json [--per-image N] END_RUN:EARLY_RUN [...]
--per-image N: N defects per held-out image instead of choice_set's (8 on sets of up to 25 held-out images).
"""
import json, sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from fusion import load_held_out  # noqa: E402  (a run, its train config and its held-out samples)

import fastflow.auto as auto  # noqa: E402
from fastflow.auto import _scores_and_maps, choice_set  # noqa: E402
from fastflow.metrics import pixel_auroc  # noqa: E402


def preset_map_auroc(run: str) -> float:
    model, _, _, tcfg, val = load_held_out(run)
    model.set_map_levels(None)  # every level, equal weights: the preset's map for these recipes
    model.set_border_offsets(None)
    normals, defective, masks = choice_set(val, tcfg.seed, model)
    h, w = model.config.input_size
    truth = np.stack([np.zeros((h, w), dtype=bool)] * len(normals) + list(masks))
    return float(pixel_auroc(_scores_and_maps(model, normals + defective)[1], truth))


args = sys.argv[2:]
if args[0] == "--per-image":
    auto.MAX_DEFECTS_PER_IMAGE = int(args[1])
    auto.CHOICE_DEFECTS = 10 ** 6  # so that the cap is the per-image count
    args = args[2:]
out = {}
for pair in args:
    end, early = pair.split(":")
    out[pair] = {"end": round(preset_map_auroc(end), 4), "early": round(preset_map_auroc(early), 4)}
    print(pair, out[pair], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)
