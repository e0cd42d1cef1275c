#!/usr/bin/env bash
# A crowd in front of a waiting room: three release replicas on one machine (ports
# 3981–3983, one PostgreSQL database boxoffice_bench_queue, Redis key prefix
# bench-queue-<pid>, all removed at the end) and `rush queue` against them.
#
#   scripts/bench-queue.sh                            # 20,000 buyers, 500 admitted/s
#   BUYERS=5000 RATE=200 OPENS_IN=5s scripts/bench-queue.sh --early-share 0.8
#
# Further arguments go to `rush queue`. Needs Redis and PostgreSQL on their local
# default ports and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

KEY="bench-queue-buyer-key-$$-of-32-bytes!"
ADMIN="bench-queue-admin-$$-token-of-32-bytes"
PREFIX="bench-queue-$$"
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB="$PG/boxoffice_bench_queue"
PORTS=(3981 3982 3983)
BUYERS=${BUYERS:-20000}
RATE=${RATE:-500}
OPENS_IN=${OPENS_IN:-15s}

cargo build --release --bins --quiet
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    redis-cli --scan --pattern "$PREFIX:*" | xargs -r -d '\n' -n 500 redis-cli del >/dev/null
    PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qAtc \
        'DROP DATABASE IF EXISTS boxoffice_bench_queue WITH (FORCE)' >/dev/null
}
trap cleanup EXIT

# Migrated once up front, so the replicas do not race on it.
DATABASE_URL=$DB target/release/boxoffice migrate >/dev/null
urls=()
for port in "${PORTS[@]}"; do
    BOXOFFICE_LISTEN=127.0.0.1:$port DATABASE_URL=$DB BOXOFFICE_KEY_PREFIX=$PREFIX ADMIN_TOKEN=$ADMIN \
        BOXOFFICE_BUYER_JWT_KEY=$KEY BOXOFFICE_ADMISSION_KEY="bench-queue-admission-key-$$-32-bytes" \
        BOXOFFICE_INSTANCE_ID=queue-$port RUST_LOG=warn BOXOFFICE_LOG_FORMAT=json \
        target/release/boxoffice serve >/dev/null 2>&1 &
    pids+=($!)
    urls+=(--url "http://127.0.0.1:$port")
done
for port in "${PORTS[@]}"; do
    for _ in $(seq 1 100); do curl -fs "127.0.0.1:$port/health/ready" >/dev/null && break; sleep 0.1; done
done
echo "$(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(date -u '+%Y-%m-%d %H:%M UTC')"
target/release/rush queue "${urls[@]}" --admin-token "$ADMIN" --buyer-key "$KEY" \
    --redis-url redis://127.0.0.1:6379 --buyers "$BUYERS" --rate "$RATE" --opens-in "$OPENS_IN" "$@"
