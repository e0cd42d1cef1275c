#!/usr/bin/env bash
# The buyer's page in a real browser: builds examples/storefront with npm, brings up a
# local fleet (scripts/fleet.sh: 2 replicas, nginx serving the API and /shop/) on its
# own ports, Redis key prefix and database, and runs the page's tests in headless
# Chromium (playwright-core): a purchase, a double click, a lost answer retried, sold
# out, a hold expiring, a hold confirmed or released, a waiting room, a sign-in link,
# two buyers in one tab, the security headers.
#
#   scripts/storefront-test.sh [SCREENSHOT.png]   # also pictures the page on a phone
#
# Needs node with npm, Debian's chromium (CHROMIUM to use another), nginx, and Redis
# and PostgreSQL on their local default ports. BIN_DIR picks the binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${BIN_DIR:-target/debug}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
export DATABASE_URL="$PG/boxoffice_storefront_test"
export BOXOFFICE_KEY_PREFIX="storefront-test-$$"
export ADMIN_TOKEN="storefront-test-$$-admin-token-of-32-bytes"
export BOXOFFICE_BUYER_JWT_KEY="storefront-test-buyer-key-$$-of-32-bytes-or-more"
export BOXOFFICE_ADMISSION_KEY="storefront-test-admission-key-$$-of-32-bytes"
export BOXOFFICE_SHUTDOWN_DRAIN_MS=500
export BOXOFFICE_LOG_FORMAT=json
export FLEET_DIR=target/storefront-test
export FLEET_PORT=3970
export FLEET_BASE_PORT=3971
export FLEET_BIN="$BIN_DIR/boxoffice"

cleanup() {
    scripts/fleet.sh down >/dev/null 2>&1 || true
    redis-cli --scan --pattern "$BOXOFFICE_KEY_PREFIX:*" | xargs -r -d '\n' -n 500 redis-cli del >/dev/null
    psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_storefront_test WITH (FORCE)' >/dev/null
}
trap cleanup EXIT
cleanup

echo "== build the page (vite), on the client generated from openapi/openapi.json"
(cd examples/storefront && npm ci --no-audit --no-fund --loglevel=error && npm run -s build)

echo "== fleet up: 2 replicas, nginx on 127.0.0.1:$FLEET_PORT with /shop/"
scripts/fleet.sh up 2
curl -fsS -o /dev/null "127.0.0.1:$FLEET_PORT/shop/" || { echo "/shop/ is not served" >&2; exit 1; }

echo "== the page in headless Chromium"
screenshot=${1:+$(realpath -m "$1")}
# In a subshell: the cleanup on exit runs from the repository's root.
(cd examples/storefront && BOXOFFICE_URL="http://127.0.0.1:$FLEET_PORT" \
    BUYER_JWT_KEY=$BOXOFFICE_BUYER_JWT_KEY SCREENSHOT=$screenshot npm test)
