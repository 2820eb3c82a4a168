#!/usr/bin/env bash
# Installs Debian's chromium (/usr/bin/chromium) for the dashboard's browser tests, if it is missing.
# Idempotent; never downloads a browser build of its own (Playwright drives this one via executable_path).
set -euo pipefail
CHROMIUM="${FAR_MESH_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "ensure_chromium: $CHROMIUM is missing and we are not root (no sudo): install the Debian package 'chromium'" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
if [ ! -x "$CHROMIUM" ]; then
  echo "ensure_chromium: apt-get installed chromium but $CHROMIUM is still missing" >&2
  exit 1
fi
echo "ensure_chromium: installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
