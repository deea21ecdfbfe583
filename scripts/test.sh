#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Builds the development hosts once (scripts/setup_host.sh), then runs pytest with each host's own
# python: the whole suite on the first host (ComfyUI 0.3.75 in .venv), and the host-level tests
# (see tests/conftest.py) on the second (ComfyUI 0.33 in .venv-comfyui-<version>) when it is set up. Every run says which host its results came from; the
# last line adds them up. The exit code is non-zero when a run on either host fails.
# PRODUCTSCENE_SECOND_HOST picks the second ComfyUI (a tree or tarball; "none": the first alone);
# PRODUCTSCENE_REQUIRE_SECOND_HOST=1 (set by .ci/run) fails when there is none.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/setup_host.sh"
bash "$root/scripts/setup_browser.sh"   # chromium for the canvas tests (tests/test_canvas_browser.py)
cd "$root"

mapfile -t hosts < "$root/.venv/productscene-hosts"
if [ "${PRODUCTSCENE_REQUIRE_SECOND_HOST:-}" = 1 ] && [ "${#hosts[@]}" -lt 2 ]; then
  echo "test.sh: PRODUCTSCENE_REQUIRE_SECOND_HOST=1 but no second ComfyUI is set up (scripts/setup_host.sh" \
       "looks for ../shared/hosts/comfyui-0.33.0.tar.gz or \$PRODUCTSCENE_SECOND_HOST)" >&2
  exit 1
fi
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
status=0
passed=0 failed=0 skipped=0
lines=()
for i in "${!hosts[@]}"; do
  IFS=$'\t' read -r version python tree <<< "${hosts[$i]}"
  if [ "$i" = 0 ]; then
    scope="all tests"
    run_env=()
  else
    scope="host-level tests"
    run_env=(PRODUCTSCENE_COMFYUI="$tree" PRODUCTSCENE_HOST_TESTS_ONLY=1)
  fi
  echo "========== ComfyUI $version: $scope ($python) =========="
  start=$SECONDS
  set +e
  env "${run_env[@]}" "$python" -m pytest -q "$@" < /dev/null 2>&1 | tee "$logs/$i.log"
  code=${PIPESTATUS[0]}
  set -e
  # conftest.py's closing line: "[ComfyUI x.y.z] <scope>: N passed, N failed, N skipped"
  counts=$(grep -E '^\[ComfyUI [^]]*\] [a-z -]+: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$logs/$i.log" | tail -n 1 || true)
  if [ "$i" != 0 ] && [ "$code" = 5 ]; then
    code=0   # the pytest arguments selected no host-level test: nothing to run on this host
    counts="[ComfyUI $version] $scope: 0 passed, 0 failed, 0 skipped"
  fi
  if [ -z "$counts" ]; then
    counts="[ComfyUI $version] $scope: pytest ended with exit code $code before its summary"
    failed=$((failed + 1))
  else
    read -r p f s <<< "$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped$/\1 \2 \3/' <<< "$counts")"
    passed=$((passed + p)) failed=$((failed + f)) skipped=$((skipped + s))
  fi
  lines+=("$counts ($((SECONDS - start)) s, exit code $code)")
  [ "$code" = 0 ] || status=1
done

echo "========== results per host =========="
printf '%s\n' "${lines[@]}"
[ "${#hosts[@]}" -gt 1 ] || echo "(one host only: scripts/setup_host.sh found no second ComfyUI)"
echo "total: $passed passed, $failed failed, $skipped skipped"
exit $status
