#!/usr/bin/env bash
# Render a report.html with headless Chromium and save a PNG screenshot, to
# look at the report the way a user's browser shows it (offline: the HTML is
# self-contained). Needs the Debian `chromium` package.
#
#   tools/report_screenshot.sh <report.html> <out.png> [width] [height]
set -euo pipefail
html=${1:?usage: report_screenshot.sh <report.html> <out.png> [width] [height]}
out=${2:?usage: report_screenshot.sh <report.html> <out.png> [width] [height]}
width=${3:-1280}
height=${4:-2400}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [[ -z "$browser" ]]; then
    echo "no chromium found: apt-get install chromium" >&2
    exit 1
fi
html=$(realpath "$html")
# A throwaway profile so nothing is read from or written to the user's.
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$width,$height" \
    --screenshot="$(realpath -m "$out")" "file://$html" 2>/dev/null
echo "wrote $out"
