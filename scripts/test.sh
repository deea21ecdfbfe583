#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Builds the development host once (scripts/setup_host.sh: .venv + the real ComfyUI at .venv/comfyui),
# then runs pytest with the venv's python. The exit code is pytest's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_host.sh"
cd "$root"
set +e
"$root/.venv/bin/python" -m pytest -q "$@"
code=$?
set -e
exit $code
