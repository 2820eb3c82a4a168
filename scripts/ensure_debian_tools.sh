#!/usr/bin/env bash
# Installs the Debian packages the tests drive, if missing (idempotent; apt only, never a downloaded build):
#   chromium    the dashboard's browser tests (Playwright drives /usr/bin/chromium via executable_path)
#   prometheus  for promtool: checks and unit-tests the alert rules (tests/test_deploy_monitoring.py)
#   caddy       validates the TLS proxy config deploy/caddy/Caddyfile (tests/test_deploy_files.py)
#   iptables    the WAN lab's NAT router (infra/wanlab.py: tests/test_wan*.py, bench/wan_bench.py)
#   ethtool     the WAN lab turns offloads off on its links (its userspace delayer copies whole frames)
# --no-install-recommends: the tools only (the packages' services are not started: there is no systemd here).
# Usage: scripts/ensure_debian_tools.sh [TOOL=PACKAGE ...]   (default: all of them; TOOL is a command or a path)
set -euo pipefail
CHROMIUM="${FAR_MESH_CHROMIUM:-/usr/bin/chromium}"
[ "$#" -gt 0 ] || set -- "$CHROMIUM=chromium" promtool=prometheus caddy=caddy iptables=iptables ethtool=ethtool
have() { if [[ "$1" == /* ]]; then [ -x "$1" ]; else command -v "$1" >/dev/null 2>&1; fi; }
missing=()
for pair in "$@"; do
  have "${pair%%=*}" || missing+=("${pair#*=}")
done
[ "${#missing[@]}" -gt 0 ] || exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure_debian_tools: missing ${missing[*]} and we are not root (no sudo): install these Debian packages" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for pair in "$@"; do
  if ! have "${pair%%=*}"; then
    echo "ensure_debian_tools: apt-get installed ${pair#*=} but ${pair%%=*} is still missing" >&2
    exit 1
  fi
done
echo "ensure_debian_tools: installed ${missing[*]}"
