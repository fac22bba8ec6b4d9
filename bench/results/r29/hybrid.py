"""Twenty-ninth round: one flow's length apart from the others'. The flows of a run are independent (their own
parameters; the loss is their sum; Adam is per parameter), so a run whose flow I stops after 50 epochs while the
others train to the end is the end run with flow I's (and its norm's) kept state taken from a 50-epoch run of the same
recipe, seed and split. Writes that model as a run folder (the end run's config, map choice and threshold), for
``fastflow evaluate``. Usage (repository root):
    PYTHONPATH=src python bench/results/r29/hybrid.py END_RUN EARLY_RUN LEVEL_INDEX OUT_RUN
"""
import os, shutil, sys

from fastflow.checkpoint import load_safe, save_atomic

end, early, index, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ckpt, other = load_safe(os.path.join(end, "model.pt")), load_safe(os.path.join(early, "model.pt"))
taken = [k for k in ckpt["state"] if k.startswith((f"flows.{index}.", f"norms.{index}."))]
assert taken and set(ckpt["state"]) == set(other["state"])
for k in taken:
    ckpt["state"][k] = other["state"][k]
os.makedirs(out, exist_ok=True)
for name in ("run.json", "history.json"):
    shutil.copy(os.path.join(end, name), os.path.join(out, name))
save_atomic(ckpt, os.path.join(out, "model.pt"))
print(f"{out}: {len(taken)} tensors of flow {index} from {early}")
