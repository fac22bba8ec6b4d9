"""Twenty-fourth round: what weights.py, crit.py, heavy.py and sigmas.py share: a kept run, the synthetic set its
training scored maps on (auto.choice_set) and its test row, as images and masks at input size."""
import sys

import numpy as np
import torch

sys.path.insert(0, "bench")  # bench/fusion.py; the scripts run from the repository root
from fastflow.auto import choice_set
from fastflow.data import AnomalyDataset, Preprocess, load_samples
from fusion import load_held_out


def run_sets(run: str, fmt: str, root: str, cat: str):
    """(model, synthetic images, their masks, test images, test masks): masks (N, H, W) bool at the model's input
    size; the synthetic set is the held-out normals followed by their pasted copies."""
    torch.set_num_threads(2)
    model, ckpt, _, tcfg, val = load_held_out(run)
    normals, defective, masks = choice_set(val, tcfg.seed, model)
    h, w = model.config.input_size
    truth = np.stack([np.zeros((h, w), bool)] * len(normals) + list(masks))
    ds = AnomalyDataset(load_samples(fmt, root, cat, "test"), Preprocess.from_dict(ckpt["preprocess"]))
    items = [ds[i] for i in range(len(ds))]
    tmask = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
    return model, normals + defective, truth, [it["image"] for it in items], tmask
