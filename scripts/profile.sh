#!/usr/bin/env bash
# Where the server's work per request goes: the release binary under callgrind,
# instructions per request for `GET /health/live`, a purchase with one purchase per
# script call (cap 1) and a coalesced purchase (cap 128), and for each purchase run
# the functions that account for the difference from `/health/live`.
#
# Instruction counts do not depend on what else the machine is doing, so unlike
# throughput they compare across runs. They leave out the kernel (sockets,
# wake-ups), which `perf` shows; Redis and PostgreSQL are other processes.
#
#   scripts/profile.sh                  # needs valgrind (apt-get install valgrind)
#   REQUESTS=2000 scripts/profile.sh
#
# Needs Redis and PostgreSQL on their local default ports; uses its own database
# (boxoffice_profile), key prefix and port, and removes its keys at the end. The
# stream consumer is off, so the figures are the request path alone.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-3914}
REQUESTS=${REQUESTS:-4000}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
OUT=bench/profile
mkdir -p "$OUT"
cargo build --release --bins --quiet
BIN=target/release

server=""
PREFIX="profile-$$"
cleanup() {
    [[ -z $server ]] || kill "$server" 2>/dev/null || true
    redis-cli --scan --pattern "$PREFIX:*" | xargs -r -n 1000 redis-cli unlink >/dev/null
}
trap cleanup EXIT

profile() { # label, batch cap, rush args...
    local label=$1 cap=$2
    shift 2
    psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS boxoffice_profile WITH (FORCE)" 2>/dev/null
    REDIS_URL=redis://127.0.0.1:6379 BOXOFFICE_LISTEN=127.0.0.1:$PORT DATABASE_URL=$PG/boxoffice_profile \
        BOXOFFICE_KEY_PREFIX=$PREFIX ADMIN_TOKEN=profile-admin-token-of-32-bytes-or-more BOXOFFICE_LOG_FORMAT=json BOXOFFICE_CONSUMER=false \
        BOXOFFICE_PURCHASE_BATCH=$cap BOXOFFICE_REDIS_TIMEOUT_MS=20000 \
        valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/$label.callgrind" \
        "$BIN/boxoffice" serve >"$OUT/$label.log" 2>&1 &
    server=$!
    for _ in $(seq 1 600); do
        curl -fs "localhost:$PORT/health/ready" >/dev/null 2>&1 && break
        sleep 0.2
    done
    local event
    event=$(curl -fs -X POST "localhost:$PORT/api/v1/events" -H 'Authorization: Bearer profile-admin-token-of-32-bytes-or-more' \
        -H 'Content-Type: application/json' -d '{"name":"profile","totalSeats":1000000}' | jq -r .id)
    # Warm up (connections, first-use paths), then count a fixed number of requests.
    "$BIN/rush" sustained --url "http://127.0.0.1:$PORT" --event "$event" -c 32 -d 120s --requests 500 --timeout 60s "$@" >/dev/null
    callgrind_control -i on "$server" >/dev/null
    "$BIN/rush" sustained --url "http://127.0.0.1:$PORT" --event "$event" -c 32 -d 600s --requests "$REQUESTS" --timeout 60s "$@" >/dev/null
    callgrind_control -i off "$server" >/dev/null
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=""
}

profile live 128 --get /health/live
profile cap1 1
profile cap128 128

python3 - "$OUT" "$REQUESTS" <<'PY'
import re, subprocess, sys
out, n = sys.argv[1], int(sys.argv[2])
def inclusive(label):
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", f"{out}/{label}.callgrind"],
                          capture_output=True, text=True, check=True).stdout
    total, functions = 0, {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(.*?\)\s+(.*)", line)
        if not m:
            continue
        ir = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in m.group(2):
            total = ir
        else:
            name = re.sub(r"^\?\?\?:", "", m.group(2))
            name = re.sub(r" \[[^\]]*\]$", "", name)
            name = re.sub(r"^\./[^:]*:", "libc ", name)
            functions[name] = max(ir, functions.get(name, 0))
    return total / n, {k: v / n for k, v in functions.items()}
live_total, live = inclusive("live")
print(f"Instructions per request in the server process (callgrind, {n:,} requests, 32 connections, consumer off):")
print()
print("| request | instructions |")
print("| --- | --- |")
print(f"| `GET /health/live` | {live_total:,.0f} |")
for label, title in (("cap1", "purchase, one per script call"), ("cap128", "purchase, coalesced (cap 128)")):
    total, functions = inclusive(label)
    print(f"| {title} | {total:,.0f} ({total / live_total:.2f}× live) |")
for label in ("cap1", "cap128"):
    total, functions = inclusive(label)
    print()
    print(f"Largest inclusive costs of `{label}` beyond `/health/live`'s (per request):")
    print()
    print("| function | instructions | live | more |")
    print("| --- | --- | --- | --- |")
    shown = 0
    for name, ir in sorted(functions.items(), key=lambda kv: -kv[1]):
        extra = ir - live.get(name, 0)
        # Parts of the work, not the futures that wrap all of it.
        # Rust's allocator entry points only forward to malloc and free.
        wrapper = re.search(r"Endpoint>::call|Future>::poll|dispatch::|serve::|Instrumented|"
                            r"TaskLocal|tokio::runtime|std::|core::ops|__rustc::|_int_(malloc|free)", name)
        if extra < 800 or wrapper:
            continue
        print(f"| `{name[:110]}` | {ir:,.0f} | {live.get(name, 0):,.0f} | {extra:,.0f} |")
        shown += 1
        if shown == 16:
            break
PY
