#!/usr/bin/env bash
# A real browser for the canvas tests (tests/test_canvas_browser.py): Debian's chromium, driven by the
# playwright Python package (pinned in requirements-dev.txt; Playwright's own browser download is not
# used), and a CJK font so that screenshots of the Japanese and Chinese canvas are readable.
# Idempotent: installs only what is missing. Installing needs root (or passwordless sudo) and apt-get.
#   PRODUCTSCENE_CHROMIUM=/path/to/chromium   use that chromium build instead (nothing is installed)
set -euo pipefail
chromium=${PRODUCTSCENE_CHROMIUM:-/usr/bin/chromium}
if [ -n "${PRODUCTSCENE_CHROMIUM:-}" ]; then
    [ -x "$chromium" ] && exit 0
    echo "setup_browser: PRODUCTSCENE_CHROMIUM=$chromium is not an executable" >&2
    exit 1
fi
need=()
[ -x "$chromium" ] || need+=(chromium)
if ! fc-list :lang=ja 2>/dev/null | grep -q .; then
    need+=(fonts-wqy-zenhei)
fi
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo="sudo -n"
    else
        sudo="none"
    fi
fi
if [ "$sudo" = "none" ] || ! command -v apt-get >/dev/null 2>&1; then
    if [ -x "$chromium" ]; then  # only the font is missing: the tests still run
        echo "setup_browser: no CJK font (Japanese screenshots will show boxes); install fonts-wqy-zenhei as root" >&2
        exit 0
    fi
    echo "setup_browser: $chromium is missing; install Debian's chromium as root ('apt-get install -y chromium'), or set PRODUCTSCENE_CHROMIUM to a chromium executable" >&2
    exit 1
fi
echo "setup_browser: installing ${need[*]} (about 30 s)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    $sudo apt-get update >/dev/null
    $sudo apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
if [ ! -x "$chromium" ]; then
    echo "setup_browser: apt-get ran but $chromium is not there" >&2
    exit 1
fi
