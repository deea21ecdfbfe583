#!/usr/bin/env bash
# The main job: new category backgrounds for the sample products through a real, headless ComfyUI.
#   bash scripts/demo.sh [--checkpoint PATH] [--library PATH] [--clip-vision PATH --adapter PATH] [--server URL]
#                        [--out DIR] [--steps N] [--size PX]
# Builds the development host on first use (scripts/setup_host.sh returns at once afterwards), then
# runs scripts/demo.py with the venv's python. Output: output/demo/<product>.png, output/demo/brand/<product>.png
# (with a brand reference) and contact_sheet.png.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_host.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"
