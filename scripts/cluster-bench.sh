#!/usr/bin/env bash
# One Redis against a Redis Cluster of three masters, same client, same run:
#
# 1. purchases of three events at once (one per master on the cluster): purchases/s
#    and Redis CPU per sale;
# 2. the consumer's drain: SALES sales spread over 1, 100 and 10,000 events, made
#    with no consumer running, then the time `boxoffice worker` takes to write them.
#
#   scripts/cluster-bench.sh           # DURATION=10s CONNECTIONS=32 SALES=10000 by default
#
# Starts its own redis-servers on loopback (ports 7300 for the single one, 7301-7303
# for the cluster; no replicas, so no WAIT: this measures the gate's path) and one
# release server per side on port 3951 with a PostgreSQL database of its own. Runs
# three `rush sustained` at once, one per event, and reads each Redis server's
# `used_cpu_user + used_cpu_sys` before and after. Needs redis-server, redis-cli,
# psql, jq, curl.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
SALES=${SALES:-10000}
PORT=3951
PG=${PG:-postgres://postgres@127.0.0.1:5432}
TOKEN=cluster-bench-admin-token-of-32-bytes
URL="http://127.0.0.1:$PORT"
OUT=bench/cluster
unset DATABASE_URL
rm -rf "$OUT" && mkdir -p "$OUT"
work=$(mktemp -d)
pids=()
server=

cleanup() {
    [[ -z $server ]] || { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
    PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qAtc \
        "DROP DATABASE IF EXISTS boxoffice_cluster_bench WITH (FORCE)" || true
}
trap cleanup EXIT

redis() { # port [cluster args...]
    local port=$1
    shift
    mkdir -p "$work/$port"
    (cd "$work/$port" && exec redis-server --port "$port" --bind 127.0.0.1 --save "" \
        --appendonly no --logfile redis.log "$@") &
    pids+=($!)
    for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
    echo "redis-server on $port did not start" >&2
    exit 1
}

cpu() { # port: seconds of CPU the server used so far
    redis-cli -p "$1" info cpu | tr -d '\r' |
        awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.3f", s}'
}

cargo build --release --quiet --bin boxoffice --bin rush
redis 7300
for port in 7301 7302 7303; do
    redis "$port" --cluster-enabled yes --cluster-config-file nodes.conf
done
redis-cli --cluster create 127.0.0.1:7301 127.0.0.1:7302 127.0.0.1:7303 --cluster-yes >/dev/null
until redis-cli -p 7303 cluster info | grep -q cluster_state:ok; do sleep 0.2; done

run() { # side redis_url cluster ports...
    local side=$1 url=$2 cluster=$3
    shift 3
    PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qAtc \
        "DROP DATABASE IF EXISTS boxoffice_cluster_bench WITH (FORCE)"
    REDIS_URL=$url BOXOFFICE_REDIS_CLUSTER=$cluster DATABASE_URL="$PG/boxoffice_cluster_bench" \
        BOXOFFICE_LISTEN=127.0.0.1:$PORT ADMIN_TOKEN=$TOKEN RUST_LOG=warn BOXOFFICE_LOG_FORMAT=json \
        target/release/boxoffice serve >"$OUT/$side.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do curl -fs "$URL/health/ready" >/dev/null && break; sleep 0.1; done
    # One event per master: an event's slot is its id's CRC16; `redis-cli --cluster
    # create` gives three masters 0-5460, 5461-10922 and 10923-16383.
    local events=() taken=()
    while ((${#events[@]} < 3)); do
        local id slot master
        id=$(curl -fs -X POST "$URL/api/v1/events" -H "Authorization: Bearer $TOKEN" \
            -H 'Content-Type: application/json' -d '{"name":"bench","totalSeats":1000000}' | jq -r .id)
        slot=$(redis-cli -p 7301 cluster keyslot "tix:{$id}:inv")
        master=$((slot <= 5460 ? 0 : slot <= 10922 ? 1 : 2))
        [[ $cluster == false || -z ${taken[$master]:-} ]] || continue
        taken[$master]=1
        events+=("$id")
    done
    local before=() after=() rushes=()
    for port in "$@"; do before+=("$(cpu "$port")"); done
    for i in 0 1 2; do
        target/release/rush sustained --url "$URL" --event "${events[$i]}" -c "$CONNECTIONS" \
            -d "$DURATION" --json >"$OUT/${side}_$i.json" &
        rushes+=($!)
    done
    wait "${rushes[@]}"
    for port in "$@"; do after+=("$(cpu "$port")"); done
    kill "$server" && wait "$server" 2>/dev/null || true
    server=
    local sales seconds used
    sales=$(jq -s 'map(.sales) | add' "$OUT/${side}"_?.json)
    seconds=$(jq -s 'map(.duration_s) | max' "$OUT/${side}"_?.json)
    used=$(python3 -c "print(sum(map(float, '${after[*]}'.split())) - sum(map(float, '${before[*]}'.split())))")
    python3 - "$side" "$sales" "$seconds" "$used" "${#before[@]}" <<'EOF'
import sys
side, sales, seconds, used, servers = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
print(f"| {side} | {servers} | {sales / seconds:,.0f} | {used / seconds * 100:.0f} % | {used * 1e6 / max(sales, 1):.1f} |")
EOF
}

# Creates `events` events and buys SALES / events seats of each, 16 requests at once.
fill() { # events
    python3 - "$URL" "$TOKEN" "$1" "$SALES" <<'EOF'
import concurrent.futures, http.client, json, sys, threading
url, token, events, sales = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host, port = url.removeprefix("http://").split(":")
local = threading.local()
def call(method, path, body, headers):
    if not hasattr(local, "conn"):
        local.conn = http.client.HTTPConnection(host, int(port))
    local.conn.request(method, path, json.dumps(body), {"Content-Type": "application/json", **headers})
    reply = local.conn.getresponse()
    data = reply.read()
    assert reply.status in (200, 201), (reply.status, data)
    return json.loads(data)
def create(i):
    return call("POST", "/api/v1/events", {"name": f"drain {i}", "totalSeats": sales},
                {"Authorization": f"Bearer {token}"})["id"]
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    ids = list(pool.map(create, range(events)))
    per = sales // events
    orders = [(e, n) for e in ids for n in range(per)]
    list(pool.map(lambda o: call("POST", f"/api/v1/events/{o[0]}/purchase", {"quantity": 1},
                                 {"Idempotency-Key": f"drain-{o[1]}"}), orders))
EOF
}

drain() { # side redis_url cluster events
    local side=$1 url=$2 cluster=$3 events=$4
    PGOPTIONS="-c client_min_messages=warning" psql "$PG/postgres" -qAtc \
        "DROP DATABASE IF EXISTS boxoffice_cluster_bench WITH (FORCE)"
    redis-cli -p 7300 flushall >/dev/null
    for port in 7301 7302 7303; do redis-cli -p "$port" flushall >/dev/null; done
    local env=(REDIS_URL="$url" BOXOFFICE_REDIS_CLUSTER="$cluster"
        DATABASE_URL="$PG/boxoffice_cluster_bench" ADMIN_TOKEN=$TOKEN RUST_LOG=warn
        BOXOFFICE_LOG_FORMAT=json BOXOFFICE_HOLD_SWEEP_MS=0)
    env "${env[@]}" BOXOFFICE_LISTEN=127.0.0.1:$PORT BOXOFFICE_CONSUMER=false \
        target/release/boxoffice serve >"$OUT/drain_$side.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do curl -fs "$URL/health/ready" >/dev/null && break; sleep 0.1; done
    fill "$events"
    local started rows took
    started=$(date +%s.%N)
    env "${env[@]}" BOXOFFICE_WORKER_LISTEN=127.0.0.1:3952 target/release/boxoffice worker \
        >>"$OUT/drain_$side.log" 2>&1 &
    local worker=$!
    pids+=("$worker")
    until rows=$(psql "$PG/boxoffice_cluster_bench" -qAtc "SELECT count(*) FROM purchases") &&
        ((rows >= SALES)); do
        sleep 0.05
    done
    took=$(python3 -c "import time; print(f'{time.time() - $started:.2f}')")
    kill "$worker" "$server"
    wait "$worker" "$server" 2>/dev/null || true
    server=
    echo "| $side | $events | $SALES rows in $took s | $(python3 -c "print(f'{$SALES / $took:,.0f}')") rows/s |"
}

echo "| Redis | servers | purchases/s (3 events, ${CONNECTIONS} connections each) | Redis CPU, all servers | Redis CPU µs per sale |"
echo "| --- | --- | --- | --- | --- |"
run single redis://127.0.0.1:7300 false 7300
run cluster redis://127.0.0.1:7301,redis://127.0.0.1:7302,redis://127.0.0.1:7303 true 7301 7302 7303

echo
echo "| Redis | events | drain | rate |"
echo "| --- | --- | --- | --- |"
for events in 1 100 10000; do
    drain single redis://127.0.0.1:7300 false "$events"
    drain cluster redis://127.0.0.1:7301,redis://127.0.0.1:7302,redis://127.0.0.1:7303 true "$events"
done
