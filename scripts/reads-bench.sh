#!/usr/bin/env bash
# What the reads whose cost grows with the number of events cost Redis: with EVENTS
# events (default 10,000), `GET /api/v1/events` (first page and a later one) and
# `GET /api/v1/stats` at RATE requests/s (default 50) for SECONDS (default 30),
# against a private Redis. Reports Redis CPU per request (the run's CPU less an idle
# run's of the same length), latencies, and whether `/health/ready` answered 200
# throughout. The hold sweeper is off (BOXOFFICE_HOLD_SWEEP_MS=0): with 10,000 events
# it alone keeps Redis busy (docs/operations.md, "Known limits"), which would bury
# what the reads cost.
#
#   scripts/reads-bench.sh [BINARY]          (default target/release/boxoffice)
#   EVENTS=10000 RATE=50 SECONDS=30 scripts/reads-bench.sh
#
# Starts its own redis-server (port REDIS_PORT, default 6391) and server (port 3941,
# database boxoffice_reads) and removes what it created.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${1:-target/release/boxoffice}
EVENTS=${EVENTS:-10000}
RATE=${RATE:-50}
SECONDS_=${SECONDS:-30}
REDIS_PORT=${REDIS_PORT:-6391}
PORT=${PORT:-3941}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
TOKEN="reads-bench-$$-admin-token-of-32-bytes-or-more"
dir=$(mktemp -d)

redis= server=
cleanup() {
    [[ -n $server ]] && { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
    [[ -n $redis ]] && { kill "$redis" 2>/dev/null || true; wait "$redis" 2>/dev/null || true; }
    psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_reads WITH (FORCE)' >/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
psql "$PG/postgres" -qAtc 'DROP DATABASE IF EXISTS boxoffice_reads WITH (FORCE)' >/dev/null 2>&1 || true

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --maxmemory-policy noeviction >"$dir/redis.log" 2>&1 &
redis=$!
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
BOXOFFICE_LISTEN=127.0.0.1:$PORT DATABASE_URL=$PG/boxoffice_reads REDIS_URL=redis://127.0.0.1:$REDIS_PORT \
    ADMIN_TOKEN=$TOKEN BOXOFFICE_HOLD_SWEEP_MS=0 BOXOFFICE_LOG_FORMAT=json RUST_LOG=warn "$BIN" serve &
server=$!

python3 - "$PORT" "$REDIS_PORT" "$TOKEN" "$EVENTS" "$RATE" "$SECONDS_" <<'EOF'
import http.client, json, socket, subprocess, sys, threading, time

port, redis_port, token = int(sys.argv[1]), sys.argv[2], sys.argv[3]
events, rate, seconds = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])

def conn():
    return http.client.HTTPConnection("127.0.0.1", port, timeout=10)

for _ in range(300):
    try:
        c = conn(); c.request("GET", "/health/ready"); c.getresponse().read(); break
    except OSError:
        time.sleep(0.1)

c = conn()
started = time.time()
for i in range(events - 1):  # the default event is one
    c.request("POST", "/api/v1/events", json.dumps({"name": f"e{i}", "totalSeats": 10}),
              {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status == 201, r.status
print(f"{events} events created in {time.time() - started:.0f} s")

def redis_cpu():
    out = subprocess.check_output(["redis-cli", "-p", redis_port, "INFO", "cpu"], text=True)
    f = dict(l.split(":", 1) for l in out.split() if ":" in l)
    return float(f["used_cpu_user"]) + float(f["used_cpu_sys"])

time.sleep(3)  # let the servers settle after the creations
idle0 = redis_cpu(); time.sleep(seconds); idle = redis_cpu() - idle0

# A later page: the id after which the second page starts. (A new connection: the
# server closed the idle one.)
c = conn()
c.request("GET", "/api/v1/events?limit=100"); r = c.getresponse(); r.read()
after = r.getheader("Link").split("after=")[1].split("&")[0]
paths = ["/api/v1/events", f"/api/v1/events?after={after}", "/api/v1/stats"]

ready_bad = []
stop = False
def probe():
    p = conn()
    while not stop:
        try:
            p.request("GET", "/health/ready"); r = p.getresponse(); r.read()
            if r.status != 200: ready_bad.append(r.status)
        except OSError as e:
            ready_bad.append(str(e)); p = conn()
        time.sleep(0.2)
threading.Thread(target=probe, daemon=True).start()

took = []
cpu0 = redis_cpu(); t0 = time.time(); n = 0
while time.time() - t0 < seconds:
    due = t0 + n / rate
    if due > time.time(): time.sleep(due - time.time())
    s = time.time()
    c.request("GET", paths[n % len(paths)]); r = c.getresponse(); r.read()
    assert r.status == 200, r.status
    took.append(time.time() - s); n += 1
busy = redis_cpu() - cpu0
stop = True
took.sort()
per = (busy - idle) / n * 1e6
print(f"{n} reads at {n / (time.time() - t0):.1f}/s ({', '.join(paths)} in turn)")
print(f"Redis CPU: {busy:.3f} s with the reads, {idle:.3f} s idle over {seconds} s: "
      f"{per:.0f} µs per read")
print(f"latency p50 {took[len(took)//2]*1e3:.2f} ms, p99 {took[len(took)*99//100]*1e3:.2f} ms, "
      f"max {took[-1]*1e3:.2f} ms")
print(f"/health/ready: {'200 throughout' if not ready_bad else ready_bad}")
sys.exit(1 if ready_bad or per > 1000 else 0)
EOF
