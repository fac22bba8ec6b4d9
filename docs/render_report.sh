#!/usr/bin/env bash
# Render a FastFlow HTML report (from `fastflow evaluate ... --report`) to a PNG screenshot with
# headless Chromium, e.g. to look at it on a server without a desktop or to attach it to a ticket.
#
#   docs/render_report.sh RUN_DIR/report.html [OUT.png] [WIDTHxHEIGHT]
#
# OUT.png defaults to the report path with .png; the window defaults to 1280 wide and as tall as the
# report says it is (its <meta name="fastflow-page-height">), so that every gallery is in the picture
# (1280x2400 for a report without it). Needs Chromium: on Debian/Ubuntu
# `apt-get install -y chromium` (the binary may also be called chromium-browser or google-chrome;
# set CHROMIUM=/path/to/binary to choose). The report is self-contained, so no network is used:
# the flags below also switch off Chromium's own background traffic, and a throw-away profile
# folder keeps your real profile untouched.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 3 ]]; then
  echo "usage: $0 REPORT.html [OUT.png] [WIDTHxHEIGHT]" >&2
  exit 2
fi
report=$1
out=${2:-${report%.html}.png}
if [[ ! -f $report ]]; then
  echo "$0: no such report: $report" >&2
  exit 2
fi
height=$(grep -o 'name="fastflow-page-height" content="[0-9]*"' "$report" | grep -o '[0-9]*"$' | tr -d '"' || true)
size=${3:-1280x${height:-2400}}
browser=${CHROMIUM:-}
if [[ -z $browser ]]; then
  for name in chromium chromium-browser google-chrome; do
    if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
  done
fi
if [[ -z $browser ]]; then
  echo "$0: Chromium not found; install it (apt-get install -y chromium) or set CHROMIUM=/path" >&2
  exit 2
fi

profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
abs_report=$(cd "$(dirname "$report")" && pwd)/$(basename "$report")
abs_out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile" \
  --hide-scrollbars --screenshot="$abs_out" --window-size="${size/x/,}" "file://$abs_report" \
  >/dev/null 2>&1
if [[ ! -s $abs_out ]]; then
  echo "$0: Chromium wrote no screenshot to $abs_out" >&2
  exit 1
fi
echo "$abs_out"
