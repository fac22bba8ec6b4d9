"""Twenty-eighth round: PatchCore-lite0 (bench/suite.py's peer, same settings) on the 40-image subsets that
subset.py builds, scored with our metrics code. Usage (repository root; the peer venv at bench/.venv-anomalib):
    PYTHONPATH=src python bench/results/r28/peer_n40.py DATA_ROOT WORK OUT.json CAT [CAT ...]
"""
import json, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/
from suite import peer  # noqa: E402

root, work, out, cats = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
(work / "logs").mkdir(parents=True, exist_ok=True)
result = {}
for cat in cats:
    result.update(peer(cat, ("mvtec", root, cat, [(cat, "40 training images", "mvtec", root, cat)]), work))
    print(cat, result[cat], flush=True)
with open(out, "w") as f:
    json.dump(result, f, indent=1)
