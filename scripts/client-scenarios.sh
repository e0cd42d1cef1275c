#!/usr/bin/env bash
# Generated clients against a running service. From the committed spec it generates
# the Python client with openapi-python-client (PyPI) and the TypeScript types with
# openapi-typescript (npm), failing on any generator warning (a schema a generator
# drops makes every error of the API untyped), then runs each one's scenario in
# examples/clients/ against BASE_URL: Python installed with pip, TypeScript compiled
# with tsc in strict mode (so every field it uses is checked against the spec) and
# run with openapi-fetch on node.
#
#   scripts/client-scenarios.sh BASE_URL ADMIN_TOKEN BUYER_JWT_KEY
#
# The server needs ADMIN_TOKEN, BOXOFFICE_BUYER_JWT_KEY (HS256) and
# BOXOFFICE_ADMISSION_KEY set. The generated clients are not kept. Needs python3 with pip, and node with npm.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 3 ]] || { echo "usage: $0 BASE_URL ADMIN_TOKEN BUYER_JWT_KEY" >&2; exit 2; }

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "openapi-python-client==0.29.0"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
openapi-python-client generate --path openapi/openapi.json --output-path "$work/client" \
    >"$work/generate.log" 2>&1 || { cat "$work/generate.log"; exit 1; }
cat "$work/generate.log"
if grep -qiE 'warning|unable|removal|error' "$work/generate.log"; then
    echo "openapi-python-client reported problems with openapi/openapi.json (above)" >&2
    exit 1
fi
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "$work/client"
python3 examples/clients/python/scenario.py "$@"

cd examples/clients/typescript
trap 'rm -rf "$work" node_modules generated dist' EXIT
npm install --no-audit --no-fund --no-package-lock --loglevel=error
npm run -s generate >"$work/generate-ts.log" 2>&1 || { cat "$work/generate-ts.log"; exit 1; }
cat "$work/generate-ts.log"
if grep -qiE 'warn|⚠|error' "$work/generate-ts.log"; then
    echo "openapi-typescript reported problems with openapi/openapi.json (above)" >&2
    exit 1
fi
npm run -s build
node dist/scenario.js "$@"
