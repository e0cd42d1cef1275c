#!/usr/bin/env bash
# Generated clients against a running service: generates the Python client from the
# committed spec with openapi-python-client (PyPI) — failing on any warning, as a
# schema the generator drops makes every error of the API untyped — installs it, and
# runs examples/clients/python/scenario.py against BASE_URL.
#
#   scripts/client-scenarios.sh BASE_URL ADMIN_TOKEN BUYER_JWT_KEY
#
# The server needs ADMIN_TOKEN, BOXOFFICE_BUYER_JWT_KEY (HS256) and
# BOXOFFICE_ADMISSION_KEY set. The generated client is not kept.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 3 ]] || { echo "usage: $0 BASE_URL ADMIN_TOKEN BUYER_JWT_KEY" >&2; exit 2; }

python3 -m pip install -q --disable-pip-version-check "openapi-python-client==0.29.0"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openapi-python-client generate --path openapi/openapi.json --output-path "$work/client" \
    >"$work/generate.log" 2>&1 || { cat "$work/generate.log"; exit 1; }
cat "$work/generate.log"
if grep -qiE 'warning|unable|removal|error' "$work/generate.log"; then
    echo "openapi-python-client reported problems with openapi/openapi.json (above)" >&2
    exit 1
fi
python3 -m pip install -q --disable-pip-version-check "$work/client"
python3 examples/clients/python/scenario.py "$@"
