#!/usr/bin/env bash
# The seat lifecycle's cost, measured with rush on one release server, in
# interleaved rounds (this kind of VM drifts ±10 % minute to minute):
#
#   plain    `rush sustained` purchases of an event without holds or a limit
#   holds    `rush holds`: every action a hold then its confirmation (two requests
#            per sale), no limit; sales/s
#   limited  `rush sustained` purchases with buyer tokens (10,000 buyers, so each
#            token comes again, as from buyers who hold, buy, retry) of an event
#            with maxPerBuyer and 500 live holds
#   fresh    the same with a new buyer for every request (each token checked anew)
#
# and the ratios holds/plain and limited/plain. Needs Redis and PostgreSQL on their
# local default ports, jq, curl and python3. Uses Redis logical database 11 (which
# must be empty, and which it empties at the end) and PostgreSQL database
# boxoffice_bench_lifecycle (dropped at the end), port 3930.
#
#   scripts/bench-lifecycle.sh               # 3 rounds of 8 s each, ~4 minutes
#   ROUNDS=5 DURATION=10s scripts/bench-lifecycle.sh
#
# Writes bench/lifecycle.md and the raw JSON of every run to bench/lifecycle/.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-3930}
DURATION=${DURATION:-8s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
SEATS=1000000
REDIS_DB=${LIFECYCLE_REDIS_DB:-11}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB_URL="$PG/boxoffice_bench_lifecycle"
ADMIN="bench-admin-$$-token-of-32-bytes-or-more"
BUYER_KEY="bench-buyer-key-$$-of-at-least-32-bytes"
URL="http://127.0.0.1:$PORT"
OUT=bench
RAW="$OUT/lifecycle"
rm -rf "$RAW" && mkdir -p "$RAW"

if [[ $(redis-cli -n "$REDIS_DB" dbsize) != 0 ]]; then
    echo "Redis database $REDIS_DB is not empty; set LIFECYCLE_REDIS_DB to an empty one" >&2
    exit 1
fi
server=
cleanup() {
    [[ -z $server ]] || { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    redis-cli -n "$REDIS_DB" flushdb >/dev/null
    PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS boxoffice_bench_lifecycle WITH (FORCE)" >/dev/null
}
trap cleanup EXIT
cleanup

cargo build --release --bins --quiet
BIN=target/release

REDIS_URL="redis://127.0.0.1:6379/$REDIS_DB" DATABASE_URL=$DB_URL BOXOFFICE_LISTEN=127.0.0.1:$PORT \
    ADMIN_TOKEN=$ADMIN BOXOFFICE_BUYER_JWT_KEY=$BUYER_KEY BOXOFFICE_LOG_FORMAT=json RUST_LOG=warn \
    "$BIN/boxoffice" serve >"$RAW/server.log" 2>&1 &
server=$!
for _ in $(seq 1 100); do curl -fs "$URL/health/ready" >/dev/null && break; sleep 0.1; done

create_event() { # name, extra JSON fields
    curl -fs -X POST "$URL/api/v1/events" -H "Authorization: Bearer $ADMIN" \
        -H 'Content-Type: application/json' \
        -d "{\"name\":\"$1\",\"totalSeats\":$SEATS$2}" | jq -r .id
}

# Live holds on an event, by buyers with tokens (HS256, signed here).
hold_seats() { # event, holds
    python3 - "$URL" "$1" "$2" "$BUYER_KEY" <<'EOF'
import base64, hashlib, hmac, json, sys, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, event, holds, key = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=")
def token(sub):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 3600}).encode())
    sig = b64(hmac.new(key.encode(), head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + sig).decode()
def hold(i):
    request = urllib.request.Request(
        f"{url}/api/v1/events/{event}/holds", data=b'{"quantity": 1}', method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": f"bench-hold-{i}",
                 "Authorization": "Bearer " + token(f"holder-{i}")})
    return urllib.request.urlopen(request).status
with ThreadPoolExecutor(8) as pool:
    statuses = list(pool.map(hold, range(holds)))
assert statuses.count(201) == holds, statuses
EOF
}

run() { # name, command...
    local name=$1
    shift
    if ! "$@" --json >"$RAW/$name.json"; then
        echo "$name: a check failed; see $RAW/$name.json" >&2
        exit 1
    fi
}

for round in $(seq 1 "$ROUNDS"); do
    plain=$(create_event "plain-$round" "")
    run "plain_r$round" "$BIN/rush" sustained --url "$URL" --event "$plain" -c "$CONNS" -d "$DURATION"
    run "holds_r$round" "$BIN/rush" holds --url "$URL" --admin-token "$ADMIN" --seats "$SEATS" \
        --hold-seconds 600 --max-per-buyer 0 --purchase-share 0 --confirm-share 1 \
        --release-share 0 --cancel-share 0 -c "$CONNS" -d "$DURATION"
    limited=$(create_event "limited-$round" ',"maxPerBuyer":1000,"holdSeconds":3600')
    hold_seats "$limited" 500
    run "limited_r$round" "$BIN/rush" sustained --url "$URL" --event "$limited" -c "$CONNS" \
        -d "$DURATION" --buyer-key "$BUYER_KEY" --buyers 10000
    run "fresh_r$round" "$BIN/rush" sustained --url "$URL" --event "$limited" -c "$CONNS" \
        -d "$DURATION" --buyer-key "$BUYER_KEY" --buyers 400000
    held=$(curl -fs "$URL/api/v1/events/$limited" | jq .seatsHeld)
    [[ $held == 500 ]] || { echo "limited-$round: $held seats held, not 500" >&2; exit 1; }
    echo "round $round: plain $(jq '.sales / .duration_s | floor' "$RAW/plain_r$round.json")/s," \
        "hold+confirm $(jq '.sales_per_s | floor' "$RAW/holds_r$round.json") sales/s," \
        "limited $(jq '.sales / .duration_s | floor' "$RAW/limited_r$round.json")/s," \
        "fresh buyers $(jq '.sales / .duration_s | floor' "$RAW/fresh_r$round.json")/s" >&2
done

mean() { jq -s "[.[] | $2] | add / length" "$RAW"/"$1"_r*.json; }
plain=$(mean plain '.sales / .duration_s')
holds=$(mean holds '.sales_per_s')
holds_rps=$(mean holds '.requests_per_s')
limited=$(mean limited '.sales / .duration_s')
fresh=$(mean fresh '.sales / .duration_s')
p99() { jq -s '[.[] | .latency_ms.p99] | add / length' "$RAW"/"$1"_r*.json; }
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
{
    echo "## Seat lifecycle ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "\`scripts/bench-lifecycle.sh\` (ROUNDS=$ROUNDS, DURATION=$DURATION, $CONNS connections):"
    echo "$(nproc) cores ($cpu), $(free -g | awk '/Mem:/ {print $2}') GiB; one release server,"
    echo "Redis $(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2) and PostgreSQL on the same machine, rush on it too."
    echo
    echo "| round | plain purchases/s | hold + confirm, sales/s | purchases/s, limit and holds | the same, a new buyer each |"
    echo "| --- | --- | --- | --- | --- |"
    for round in $(seq 1 "$ROUNDS"); do
        printf '| %s | %.0f | %.0f | %.0f | %.0f |\n' "$round" \
            "$(jq '.sales / .duration_s' "$RAW/plain_r$round.json")" \
            "$(jq '.sales_per_s' "$RAW/holds_r$round.json")" \
            "$(jq '.sales / .duration_s' "$RAW/limited_r$round.json")" \
            "$(jq '.sales / .duration_s' "$RAW/fresh_r$round.json")"
    done
    printf '| mean | %.0f | %.0f (%.0f requests/s) | %.0f | %.0f |\n' "$plain" "$holds" "$holds_rps" "$limited" "$fresh"
    echo
    python3 - "$plain" "$holds" "$limited" "$fresh" <<'EOF'
import sys
plain, holds, limited, fresh = map(float, sys.argv[1:])
a, b, c = holds / plain, limited / plain, fresh / plain
print(f"* hold + confirm / plain purchase: **{a:.2f}×** (target ≥ 0.45): {'met' if a >= 0.45 else 'missed'}")
print(f"* purchase with a limit and holds / plain purchase: **{b:.2f}×** (target ≥ 0.85): {'met' if b >= 0.85 else 'missed'}")
print(f"* the same with a new buyer (token) for every request: {c:.2f}×")
EOF
    printf '* p99 (ms, mean of rounds): plain %.2f, limited %.2f, new buyer each %.2f\n' \
        "$(p99 plain)" "$(p99 limited)" "$(p99 fresh)"
    echo "* every run's checks passed (rush exits non-zero otherwise)"
} | tee "$OUT/lifecycle.md"
