#!/usr/bin/env bash
# The test suite: Python tests (real Postgres/Redis/Petals swarm/EVM) and, when present, the TypeScript SDK's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_debian_tools.sh   # chromium (dashboard browser tests), promtool and caddy (deploy/ checks), iptables and ethtool (WAN lab)
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=20 "$@"
if [ -f sdk/typescript/package.json ]; then
  # npm ci again when package-lock.json changed after the last install (npm's record: node_modules/.package-lock.json)
  (cd sdk/typescript && { [ node_modules/.package-lock.json -nt package-lock.json ] || npm ci --silent --no-audit --no-fund; } &&
    npm test --silent)
fi
