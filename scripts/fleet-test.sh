#!/usr/bin/env bash
# Fleet tests through nginx on loopback with 3 replicas (scripts/fleet.sh):
#   1. a rush of 3,000 buyers for 1,000 seats reaches every replica, sells exactly
#      the capacity, and PostgreSQL ends with one row per sale;
#   2. one replica killed with SIGKILL mid-rush: clients retrying failed requests
#      with the same key end with exactly one sale per key, totals exact;
#   3. one replica stopped with SIGTERM mid-rush: no client sees a 5xx or a reset.
# Uses its own database, Redis key prefix and ports; bounded in time. Needs nginx and
# Redis/PostgreSQL on their local default ports. BIN_DIR picks the binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${BIN_DIR:-target/debug}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
export DATABASE_URL="$PG/boxoffice_fleet_test"
export BOXOFFICE_KEY_PREFIX="fleet-test-$$"
export ADMIN_TOKEN="fleet-test-$$-admin-token-of-32-bytes"
export BOXOFFICE_LOG_FORMAT=json
export BOXOFFICE_SHUTDOWN_DRAIN_MS=1000
# The killed replica's pending sales are taken over after this (default 30 s).
export BOXOFFICE_CLAIM_IDLE_MS=5000
export FLEET_DIR=target/fleet-test
export FLEET_PORT=3300
export FLEET_BASE_PORT=3301
export FLEET_BIN="$BIN_DIR/boxoffice"
LB="http://127.0.0.1:$FLEET_PORT"

cleanup() {
    scripts/fleet.sh down >/dev/null 2>&1 || true
    redis-cli --scan --pattern "$BOXOFFICE_KEY_PREFIX:*" | xargs -r -d '\n' -n 500 redis-cli del >/dev/null
    psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_fleet_test WITH (FORCE)' >/dev/null
}
trap cleanup EXIT
cleanup

new_event() { # seats -> id
    curl -fs -X POST "$LB/api/v1/events" -H "Authorization: Bearer $ADMIN_TOKEN" \
        -H 'Content-Type: application/json' -d "{\"name\":\"fleet\",\"totalSeats\":$1}" | jq -r .id
}
replica_pid() { cat "$FLEET_DIR/app-$1.pid"; }
purchases_on() { # replica -> purchase requests it served
    curl -fs "127.0.0.1:$((FLEET_BASE_PORT + $1 - 1))/metrics" |
        awk '/^boxoffice_http_requests_total\{route="\/api\/v1\/events\/\{id\}\/purchase"/ {n += $2} END {print n + 0}'
}
rush() { "$BIN_DIR/rush" "$@" --url "$LB" --database-url "$DATABASE_URL"; }

echo "== fleet up: 3 replicas behind nginx"
scripts/fleet.sh up 3

echo "== 1. 3,000 buyers for 1,000 seats through nginx"
event=$(new_event 1000)
rush sustained --event "$event" -c 64 -d 60s --requests 3000
sold=$(curl -fs "$LB/api/v1/events/$event" | jq .seatsSold)
[[ $sold == 1000 ]] || { echo "sold $sold seats, expected exactly 1000" >&2; exit 1; }
for i in 1 2 3; do
    n=$(purchases_on "$i")
    echo "replica $i served $n purchase requests"
    [[ $n -gt 0 ]] || { echo "replica $i got no traffic" >&2; exit 1; }
done

echo "== 2. SIGKILL one replica mid-rush; clients retry with the same key"
event=$(new_event 100000)
(sleep 1.5 && kill -9 "$(replica_pid 2)") &
rush sustained --event "$event" -c 32 -d 4s --retry-failed 5
wait
scripts/fleet.sh status || true

echo "== 3. SIGTERM one replica mid-rush: no 5xx, no reset"
event=$(new_event 100000)
(sleep 1.5 && kill -TERM "$(replica_pid 3)") &
rush sustained --event "$event" -c 32 -d 5s
wait
if kill -0 "$(replica_pid 3)" 2>/dev/null; then
    echo "replica 3 is still running after SIGTERM" >&2
    exit 1
fi
echo "fleet tests passed"
