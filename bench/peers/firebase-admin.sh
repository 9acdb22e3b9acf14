#!/usr/bin/env bash
# Runs firebase-admin (Python, its HTTP/2 path: messaging.send_each_async over httpx) against
# mock-fcm (installed here on first use; not part of cargo test).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# A directory of its own under .py: its dependencies (h2, cryptography, PyJWT) overlap
# aioapns's, and pip --target keeps whichever was installed first.
lib="$here/.py/firebase-admin"
if [ ! -d "$lib/firebase_admin" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$lib" firebase-admin==7.7.0 >&2
fi
# The mock's CA, trusted for the two clients firebase-admin uses: requests (the OAuth token
# exchange at the service account's token_uri, HTTP/1.1) and httpx (messages:send, HTTP/2).
export REQUESTS_CA_BUNDLE="$MOCK_CA" SSL_CERT_FILE="$MOCK_CA"
PYTHONPATH="$lib" exec python3 "$here/firebase_admin_peer.py"
