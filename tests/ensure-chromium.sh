#!/usr/bin/env bash
# The dashboard's test (tests/integration/test_dashboard.py) drives Debian's Chromium:
# install it when it is missing (quietly, once; no recommends but a font).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
echo "installing chromium for the dashboard test" >&2
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium fonts-liberation >/dev/null
