#!/usr/bin/env bash
# Run the README's quick start, as written, from a fresh clone; exit non-zero when any command fails.
#
#     docs/quickstart.sh [REPO [BRANCH]]        # default: this repository, its checked-out branch
#
# The commands are read from README.md's "## Quick start" section at run time (indented code lines and
# ``` fenced lines that start with `fastflow`, `python -m fastflow` or `pip`); optional parts written as
# [--flag] are left out. Each command is echoed, run from the clone's root, and timed; the whole log is
# also written to quickstart.log in the current folder (the README shows it).
#
# Environment (all optional):
#   QUICKSTART_VENV=DIR         use this virtual environment's python, with the clone's src/ first on
#                               PYTHONPATH, instead of creating a venv and `pip install -e '.[export]'`
#   QUICKSTART_DATA=DIR         stands in for the README's data root (../shared/data/mvtec_ad) in every command;
#                               without it, the clone gets a ../shared link to the original repository's
#   QUICKSTART_TRAIN_ARGS="..." appended to `fastflow train` (only for a quick smoke test of this script, e.g.
#                               "--epochs 1 --input-size 64"; the README's quick start is run without it)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
repo="${1:-$here}"
branch="${2:-$(git -C "$repo" rev-parse --abbrev-ref HEAD)}"
log="$PWD/quickstart.log"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastflow-quickstart.XXXXXX")"
: > "$log"
say() { echo "$@" | tee -a "$log"; }

say "# fresh clone of $repo ($branch) in $work/fastflow"
git clone --quiet --branch "$branch" "$repo" "$work/fastflow"
cd "$work/fastflow"
say "# commit $(git rev-parse --short HEAD)"

if [[ -n "${QUICKSTART_VENV:-}" ]]; then
    export PATH="$QUICKSTART_VENV/bin:$PATH"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    say "# using $QUICKSTART_VENV with PYTHONPATH=$PWD/src"
else
    say "+ python3 -m venv .venv && .venv/bin/pip install -e '.[export]'"
    python3 -m venv .venv
    .venv/bin/pip install --quiet -e '.[export]' 2>&1 | tee -a "$log"
    export PATH="$PWD/.venv/bin:$PATH"
fi
test "$(python -c 'import fastflow, os; print(os.path.dirname(fastflow.__file__))')" = "$PWD/src/fastflow" \
    || { say "error: fastflow is not imported from the clone"; exit 1; }

readme_root="../shared/data/mvtec_ad"
if [[ -z "${QUICKSTART_DATA:-}" && -d "$repo/../shared" && ! -e "$work/shared" ]]; then
    ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"  # the README's relative data path, from the clone
fi

mapfile -t commands < <(python - README.md <<'PY'
import re, sys
text = open(sys.argv[1]).read()
m = re.search(r"^## Quick start\s*$(.*?)(?=^## )", text, re.M | re.S)
if not m:
    sys.exit("README.md has no '## Quick start' section")
fenced = False
for line in m.group(1).splitlines():
    if line.strip().startswith("```"):
        fenced = not fenced
        continue
    if not (fenced or line.startswith("    ")):
        continue
    cmd = line.strip()
    if re.match(r"(fastflow|python3? -m fastflow|pip3?) ", cmd):
        cmd = re.sub(r"\s*\[[^\]]*\]", "", cmd)  # optional parts: [--json]
        print(re.sub(r"\s+#.*$", "", cmd))
PY
)
[[ ${#commands[@]} -gt 0 ]] || { say "error: no commands found in README.md's quick start"; exit 1; }

n=0
for cmd in "${commands[@]}"; do
    if [[ -n "${QUICKSTART_DATA:-}" ]]; then
        cmd="${cmd//$readme_root/$QUICKSTART_DATA}"
    fi
    if [[ -n "${QUICKSTART_TRAIN_ARGS:-}" && "$cmd" =~ ^(fastflow|python3?\ -m\ fastflow)\ +train\  ]]; then
        cmd="$cmd $QUICKSTART_TRAIN_ARGS"
    fi
    say "+ $cmd"
    start=$(date +%s)
    if ! bash -o pipefail -c "$cmd" 2>&1 | tee -a "$log"; then
        say "FAILED: $cmd"
        exit 1
    fi
    say "# ($(( $(date +%s) - start )) s)"
    n=$((n + 1))
done
say "quick start OK: $n commands from README.md ran without error (clone left in $work)"
