#!/usr/bin/env bash
# POST a JSON payload to the serving container's /invocations and print the answer.
#
#   local_test/predict.sh [PAYLOAD] [URL]
#
# PAYLOAD defaults to local_test/payloads/single.json, URL to
# http://127.0.0.1:${PORT:-8080}/invocations. Exits non-zero on an HTTP error (the JSON error
# body is still printed).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
payload=${1:-$here/payloads/single.json}
url=${2:-http://127.0.0.1:${PORT:-8080}/invocations}
if [ ! -f "$payload" ]; then
  echo "predict.sh: $payload: no such payload file" >&2
  exit 2
fi

curl -sS --fail-with-body -X POST -H 'Content-Type: application/json' --data-binary "@$payload" "$url"
echo
