#!/usr/bin/env bash
# Runs aioapns against the mock (installed here on first use; not part of cargo test).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -d "$here/.py/aioapns" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$here/.py" aioapns==4.0 >&2
fi
PYTHONPATH="$here/.py" exec python3 "$here/aioapns_peer.py"
