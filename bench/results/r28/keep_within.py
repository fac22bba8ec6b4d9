"""Twenty-eighth round, a lead: a preset trained with another ``TrainConfig.keep_last_within`` (the tolerance of
``keep_epoch="last"``), as `fastflow train --backbone PRESET` would train it otherwise; the run folder is then
evaluated with `fastflow evaluate`.
    PYTHONPATH=src python bench/results/r28/keep_within.py ROOT CAT PRESET WITHIN SEED RUN_DIR
"""
import sys
from dataclasses import replace

from fastflow.config import PRESETS
from fastflow.data import load_samples
from fastflow.train import train

root, cat, preset, within, seed, run_dir = sys.argv[1:7]
p = PRESETS[preset]
train(p.model, replace(p.train, keep_last_within=float(within), seed=int(seed)), load_samples("mvtec", root, cat, "train"),
      run_dir, progress=False)
