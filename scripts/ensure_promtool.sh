#!/usr/bin/env bash
# Installs Debian's prometheus package for `promtool` (tests/test_deploy_monitoring.py checks and unit-tests the alert
# rules in deploy/prometheus/ with it), if it is missing. Idempotent; same pattern as ensure_chromium.sh.
set -euo pipefail
PROMTOOL="${FAR_MESH_PROMTOOL:-/usr/bin/promtool}"
if [ -x "$PROMTOOL" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure_promtool: $PROMTOOL is missing and we are not root (no sudo): install the Debian package 'prometheus'" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# --no-install-recommends: promtool only, no prometheus-node-exporter and friends
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if [ ! -x "$PROMTOOL" ]; then
  echo "ensure_promtool: apt-get installed prometheus but $PROMTOOL is still missing" >&2
  exit 1
fi
echo "ensure_promtool: installed $("$PROMTOOL" --version 2>/dev/null | head -1)"
