#!/usr/bin/env bash
# Runs @parse/node-apn against the mock (installed here on first use; not part of cargo test).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -d "$here/.node/node_modules/@parse/node-apn" ]; then
  mkdir -p "$here/.node"
  npm install --silent --no-audit --no-fund --prefix "$here/.node" @parse/node-apn@8 >&2
fi
NODE_PATH="$here/.node/node_modules" exec node "$here/node-apn.js"
