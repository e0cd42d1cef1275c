#!/usr/bin/env bash
# Purchase throughput under each Redis persistence setting, for the durability guide
# in docs/operations.md. Starts its own redis-server (port 6391, data in a temporary folder)
# once per setting, a release boxoffice against it and its own database, and runs
# the same rush each time. Needs redis-server and PostgreSQL on 127.0.0.1:5432.
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT=6391
APP_PORT=3910
DURATION=${DURATION:-10s}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
# Each server and rush run below names its database; one in the caller's DATABASE_URL
# would make rush check rows there.
unset DATABASE_URL
DB_URL="$PG/boxoffice_durability"
cargo build --release --bins --quiet

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.5
    rm -rf "$work"
    psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_durability WITH (FORCE)' >/dev/null
}
trap cleanup EXIT

echo "| Redis persistence | purchases/s | p50 ms | p99 ms |"
echo "| --- | --- | --- | --- |"
for mode in none everysec always; do
    psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_durability WITH (FORCE)' >/dev/null
    rm -rf "${work:?}/$mode" && mkdir -p "$work/$mode"
    case $mode in
        none) persistence=(--appendonly no --save "") ;;
        *) persistence=(--appendonly yes --appendfsync "$mode" --save "") ;;
    esac
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$work/$mode" "${persistence[@]}" \
        --logfile "$work/$mode/redis.log" &
    redis=$!
    pids+=("$redis")
    until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.1; done
    BOXOFFICE_LISTEN=127.0.0.1:$APP_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT DATABASE_URL=$DB_URL \
        ADMIN_TOKEN=durability-admin-token-of-32-bytes-or-more BOXOFFICE_LOG_FORMAT=json target/release/boxoffice serve \
        >>"$work/app.log" 2>&1 &
    app=$!
    pids+=("$app")
    until curl -fs "127.0.0.1:$APP_PORT/health/ready" >/dev/null 2>&1; do sleep 0.1; done
    event=$(curl -fs -X POST "127.0.0.1:$APP_PORT/api/v1/events" -H 'Authorization: Bearer durability-admin-token-of-32-bytes-or-more' \
        -H 'Content-Type: application/json' -d '{"name":"durability","totalSeats":1000000}' | jq -r .id)
    target/release/rush sustained --url "http://127.0.0.1:$APP_PORT" --event "$event" -c 64 \
        -d "$DURATION" --json >"$work/$mode.json"
    jq -r --arg mode "$mode" \
        '"| \($mode) | \(.throughput_rps | floor) | \(.latency_ms.p50) | \(.latency_ms.p99) |"' "$work/$mode.json"
    kill "$app" "$redis"
    wait "$app" "$redis" 2>/dev/null || true
done
