#!/usr/bin/env bash
# Installs the Debian packages the deploy/ checks use, if missing (same pattern as ensure_chromium.sh; idempotent):
#   prometheus  for promtool: checks and unit-tests the alert rules (tests/test_deploy_monitoring.py)
#   caddy       validates the TLS proxy config deploy/caddy/Caddyfile (tests/test_deploy_files.py)
# --no-install-recommends: the tools only (the packages' services are not started: there is no systemd here).
set -euo pipefail
declare -A NEED=([promtool]=prometheus [caddy]=caddy)
missing=()
for tool in "${!NEED[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${NEED[$tool]}")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure_deploy_tools: missing ${missing[*]} and we are not root (no sudo): install the Debian packages" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for tool in "${!NEED[@]}"; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "ensure_deploy_tools: apt-get installed ${NEED[$tool]} but $tool is still missing" >&2
    exit 1
  fi
done
echo "ensure_deploy_tools: installed ${missing[*]}"
