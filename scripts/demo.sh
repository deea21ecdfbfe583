#!/usr/bin/env bash
# The main job: new category backgrounds for the sample products through a real, headless ComfyUI.
#   bash scripts/demo.sh [--checkpoint PATH] [--library PATH] [--clip-vision PATH --adapter PATH] [--server URL]
#                        [--out DIR] [--steps N] [--size PX]
#   bash scripts/demo.sh --checkpoint flux1-dev.safetensors --text-encoder clip_l.safetensors \
#                        --text-encoder t5xxl_fp16.safetensors --vae ae.safetensors --library LIB
#   bash scripts/demo.sh --checkpoint z_image_turbo_bf16.safetensors --text-encoder qwen_3_4b.safetensors \
#                        --vae ae.safetensors --library LIB
# (the family is read from the --checkpoint file's weight names; each family runs its own workflow)
# Builds the development host on first use (scripts/setup_host.sh returns at once afterwards), then
# runs scripts/demo.py with the venv's python. Output: output/demo/<product>.png, output/demo/brand/<product>.png
# (with a brand reference) and contact_sheet.png.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_host.sh"
exec "$root/.venv/bin/python" "$root/scripts/demo.py" "$@"
