#!/usr/bin/env bash
# `make contracts`: install the pinned npm solc (offline from the npm registry cache if needed) and compile.
# Usage: contracts/build.sh [--check]
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d node_modules/solc ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
exec node build.js "$@"
