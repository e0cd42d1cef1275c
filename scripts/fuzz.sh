#!/usr/bin/env bash
# Contract fuzzing: schemathesis (PyPI) against a running instance's /openapi.json,
# with the checks and settings of schemathesis.toml (every check but one). Starts its
# own instance (own port, database and Redis key prefix) from BIN_DIR and removes what
# it created. Arguments go to `schemathesis run` (e.g. `--seed N` to replay a run).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${BIN_DIR:-target/debug}
PORT=${FUZZ_PORT:-3960}
MAX_EXAMPLES=${MAX_EXAMPLES:-50}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB_URL="$PG/boxoffice_fuzz"
PREFIX="fuzz-$$"
TOKEN="fuzz-$$-admin-token-of-32-bytes-or-more"

server=
cleanup() {
    [[ -n $server ]] && { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    redis-cli --scan --pattern "$PREFIX:*" | xargs -r -d '\n' -n 500 redis-cli del >/dev/null || true
    psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_fuzz WITH (FORCE)' >/dev/null || true
}
trap cleanup EXIT
cleanup

# Buyer and admission tokens on, and holds as long as the schema allows, so every
# schema-valid event is one this server creates (or, for an opening out of range, 422).
BOXOFFICE_LISTEN=127.0.0.1:$PORT DATABASE_URL=$DB_URL BOXOFFICE_KEY_PREFIX=$PREFIX ADMIN_TOKEN=$TOKEN \
    BOXOFFICE_BUYER_JWT_KEY="fuzz-buyer-key-$$-of-at-least-32-bytes" BOXOFFICE_MAX_HOLD_SECONDS=86400 \
    BOXOFFICE_ADMISSION_KEY="fuzz-admission-key-$$-of-at-least-32-bytes" \
    BOXOFFICE_LOG_FORMAT=json RUST_LOG=warn "$BIN_DIR/boxoffice" serve &
server=$!
schemathesis run "http://127.0.0.1:$PORT/openapi.json" --wait-for-schema 30 \
    -H "Authorization: Bearer $TOKEN" --max-examples "$MAX_EXAMPLES" --no-color "$@"
