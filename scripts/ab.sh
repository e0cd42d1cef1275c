#!/usr/bin/env bash
# Plain purchases on two builds of the server, alternating: what a change costs.
#
#   scripts/ab.sh OLD_BINARY NEW_BINARY     # e.g. a build of an earlier commit, target/release/boxoffice
#   ROUNDS=5 DURATION=10s scripts/ab.sh …
#
# Each round starts each server on an empty Redis logical database (13 by default,
# which must be empty) and a PostgreSQL database of its own (boxoffice_ab_a,
# boxoffice_ab_b: two builds may not share migrations), creates a 1,000,000-seat
# event and runs `rush sustained -c 64` against it. Port 3931. Needs jq and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# == 2 ]] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
bins=("$1" "$2")
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8s}
RDB=${AB_REDIS_DB:-13}
PORT=${PORT:-3931}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
# Each server and rush run below names its database; one in the caller's DATABASE_URL
# would make rush check rows there.
unset DATABASE_URL
URL="http://127.0.0.1:$PORT"
OUT=bench/ab
rm -rf "$OUT" && mkdir -p "$OUT"
[[ $(redis-cli -n "$RDB" dbsize) == 0 ]] || { echo "Redis database $RDB is not empty" >&2; exit 1; }

cargo build --release --bin rush --quiet
pid=
cleanup() {
    [[ -z $pid ]] || { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=; }
    redis-cli -n "$RDB" flushdb >/dev/null
}
trap 'cleanup; for s in a b; do PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS boxoffice_ab_$s WITH (FORCE)"; done' EXIT

for round in $(seq 1 "$ROUNDS"); do
    for side in a b; do
        bin=${bins[0]}
        [[ $side == b ]] && bin=${bins[1]}
        REDIS_URL="redis://127.0.0.1:6379/$RDB" DATABASE_URL="$PG/boxoffice_ab_$side" \
            BOXOFFICE_LISTEN=127.0.0.1:$PORT ADMIN_TOKEN=ab-admin-token-of-32-bytes-or-more RUST_LOG=warn BOXOFFICE_LOG_FORMAT=json \
            "$bin" serve >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 1 100); do curl -fs "$URL/health/ready" >/dev/null && break; sleep 0.1; done
        event=$(curl -fs -X POST "$URL/api/v1/events" -H 'Authorization: Bearer ab-admin-token-of-32-bytes-or-more' \
            -H 'Content-Type: application/json' -d '{"name":"ab","totalSeats":1000000}' | jq -r .id)
        target/release/rush sustained --url "$URL" --event "$event" -c 64 -d "$DURATION" --json \
            >"$OUT/${side}_r$round.json"
        cleanup
        echo "$side ($bin) round $round: $(jq '.sales / .duration_s | floor' "$OUT/${side}_r$round.json")" \
            "purchases/s, p99 $(jq .latency_ms.p99 "$OUT/${side}_r$round.json") ms"
    done
done
mean() { jq -s '[.[] | .sales / .duration_s] | add / length | floor' "$OUT/$1"_r*.json; }
a=$(mean a)
b=$(mean b)
echo "means: $a and $b purchases/s; b/a = $(python3 -c "print(f'{$b / $a:.3f}')")"
