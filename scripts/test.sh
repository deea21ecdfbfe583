#!/usr/bin/env bash
# The test command: bash scripts/test.sh [pytest args]
# Builds the development hosts once (scripts/setup_host.sh), then runs pytest with each host's own
# python: the whole suite on the first host (ComfyUI 0.3.75 in .venv), and the host-level tests
# (see tests/conftest.py) on the second (ComfyUI 0.33 in .venv-comfyui-<version>) when it is set up.
# Every run says which host its results came from; the last line adds them up. The exit code is
# non-zero when a run on either host fails.
#
# Two lanes: the tests run with one torch thread each (tests/conftest.py), so with no pytest args
# (the whole suite, as CI runs it) the learning proofs on the first host (pytest -m learning: the
# world base and three trainings; the DiT world base and one training), then its command-line tests, run beside everything else (the other
# tests on the first host, then the second host's). Their output is shown when both are done.
# PRODUCTSCENE_TEST_LANES=1 runs everything one after another; pytest args always do.
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
lane_pid=""
trap '[ -z "$lane_pid" ] || kill -- "$lane_pid" 2>/dev/null || true; rm -rf "$logs"' EXIT

# run_tests NAME HOST_INDEX SCOPE [pytest args]: one pytest run; its summary line goes to $logs/NAME.result
run_tests() {
  local name=$1 i=$2 scope=$3 version python tree code counts start=$SECONDS
  shift 3
  IFS=$'\t' read -r version python tree <<< "${hosts[$i]}"
  local run_env=()
  [ "$i" = 0 ] || run_env=(PRODUCTSCENE_COMFYUI="$tree" PRODUCTSCENE_HOST_TESTS_ONLY=1)
  echo "========== ComfyUI $version: $scope ($python) =========="
  set +e
  env "${run_env[@]}" "$python" -m pytest -q "$@" < /dev/null 2>&1 | tee "$logs/$name.log"
  code=${PIPESTATUS[0]}
  set -e
  # conftest.py's closing line: "[ComfyUI x.y.z] <scope>: N passed, N failed, N skipped"
  counts=$(grep -E '^\[ComfyUI [^]]*\] [a-z -]+: [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' "$logs/$name.log" \
           | tail -n 1 | sed -E "s/\] [a-z -]+:/] $scope:/" || true)
  if [ "$i" != 0 ] && [ "$code" = 5 ]; then
    code=0   # the pytest arguments selected no host-level test: nothing to run on this host
    counts="[ComfyUI $version] $scope: 0 passed, 0 failed, 0 skipped"
  fi
  [ -n "$counts" ] || counts="[ComfyUI $version] $scope: pytest ended with exit code $code before its summary"
  echo "$counts ($((SECONDS - start)) s, exit code $code)" > "$logs/$name.result"
}

others=()
for i in "${!hosts[@]}"; do
  [ "$i" = 0 ] || others+=("$i")
done
if [ $# -eq 0 ] && [ "${PRODUCTSCENE_TEST_LANES:-2}" != 1 ]; then
  # tests/test_cli.py and tests/test_distributed.py go with the learning proofs: they even the two
  # lanes (fresh clone at 6af0e6c on 2 cores, with tests/test_dit_training.py here too: 26.4 + 6.9 min
  # in this lane, 11.0 + 17.6 min in the other; that file, about 2 min, now runs in the other)
  ( run_tests 0-learning 0 "learning proofs" -m learning
    run_tests 0-cli 0 "command-line tests" -m "not learning" tests/test_cli.py tests/test_distributed.py ) \
    > "$logs/lane.out" 2>&1 &
  lane_pid=$!
  echo "(the learning proofs, tests/test_cli.py and tests/test_distributed.py run beside these tests on ComfyUI ${hosts[0]%%$'\t'*};" \
       "their output follows at the end)"
  run_tests 0-rest 0 "all other tests" -m "not learning" --ignore=tests/test_cli.py --ignore=tests/test_distributed.py
  for i in "${others[@]}"; do run_tests "$i" "$i" "host-level tests"; done
  wait "$lane_pid" || true
  lane_pid=""
  cat "$logs/lane.out"
  names=(0-learning 0-cli 0-rest "${others[@]}")
else
  run_tests 0 0 "all tests" "$@"
  for i in "${others[@]}"; do run_tests "$i" "$i" "host-level tests" "$@"; done
  names=(0 "${others[@]}")
fi

status=0 passed=0 failed=0 skipped=0
echo "========== results per host =========="
for name in "${names[@]}"; do
  line=$(cat "$logs/$name.result" 2>/dev/null || echo "[$name] no result: the run did not finish")
  echo "$line"
  if [[ $line =~ :\ ([0-9]+)\ passed,\ ([0-9]+)\ failed,\ ([0-9]+)\ skipped\ \(.*exit\ code\ ([0-9]+)\)$ ]]; then
    passed=$((passed + BASH_REMATCH[1])) failed=$((failed + BASH_REMATCH[2])) skipped=$((skipped + BASH_REMATCH[3]))
    [ "${BASH_REMATCH[4]}" = 0 ] || status=1
  else
    failed=$((failed + 1)) status=1
  fi
done
[ "${#hosts[@]}" -gt 1 ] || echo "(one host only: scripts/setup_host.sh found no second ComfyUI)"
echo "total: $passed passed, $failed failed, $skipped skipped"
exit $status
