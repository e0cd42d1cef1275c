#!/usr/bin/env bash
# The benchmark suite: one run, one machine, the same client (rush) for every HTTP
# figure. Needs Redis and PostgreSQL on their local default ports (as for `cargo test`),
# redis-cli, psql, jq and python3. Uses PostgreSQL databases of its own
# (boxoffice_bench*), Redis logical databases 0 and 9 under its own key prefix and 10
# (which must be empty, and which it empties), its own ports, and removes its Redis
# keys at the end.
#
#   scripts/bench.sh            # full suite, ~13 minutes after the release build
#   SOAK=10 scripts/bench.sh    # shorter RSS soak (seconds)
#
# Prints a Markdown report and writes it, with the raw JSON of every run and
# bench/batching.svg (purchases/s and p99 against offered load, one purchase per
# script call against coalesced), to bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=${PORT:-3900}
DURATION=${DURATION:-10s}
SOAK=${SOAK:-60}
DRAIN_SEATS=${DRAIN_SEATS:-100000}
# Purchases one script call may carry in the runs that compare batching (the
# service's default); those runs set 1 for the other side.
CAP=${CAP:-128}
# Offered loads (purchases/s) of the curve, each held for SWEEP_DURATION.
SWEEP=${SWEEP:-5000 10000 15000 20000 25000 30000 35000 40000 45000 50000}
SWEEP_DURATION=${SWEEP_DURATION:-5s}
RECOVERY_SALES=${RECOVERY_SALES:-100000}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
# Each server and rush run below names its database; one in the caller's DATABASE_URL
# would make rush check rows there.
unset DATABASE_URL
REDIS_HOST=127.0.0.1
REDIS_PORT=${REDIS_PORT:-6379}
# The drain phase uses a Redis logical database and a PostgreSQL database of its own:
# its memory figure must not include Redis' key table doubling, which the earlier
# phases' million keys can trigger right then (seen: 895 instead of 224 bytes per
# purchase), nor the records of those phases' events, which a server on an empty
# Redis database rightly restores.
DRAIN_REDIS_DB=${DRAIN_REDIS_DB:-9}
# The batching runs and the Redis ceiling use a Redis logical database that must be
# empty at the start, and a PostgreSQL database of their own; the suite empties both
# after each server run. Seen without that: the millions of keys of the phases before
# made Redis stall while it grew its key table, and single runs lost half their
# throughput or had p99s of 200 ms.
BATCH_REDIS_DB=${BATCH_REDIS_DB:-10}
BATCH_DB_URL="$PG/boxoffice_bench_batch"
DB_URL="$PG/boxoffice_bench"
DRAIN_DB_URL="$PG/boxoffice_bench_drain"
PREFIX="bench-$$"
TOKEN="bench-$$-admin-token-of-32-bytes-or-more"
OUT=bench
mkdir -p "$OUT"
RAW="$OUT/raw"
rm -rf "$RAW" && mkdir -p "$RAW"

cargo build --release --bins --quiet
BIN=target/release

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    # A server still stopping can write a key (its consumer's stream) after the sweep.
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for db in 0 "$DRAIN_REDIS_DB"; do
        redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$db" --scan --pattern "$PREFIX:*" |
            xargs -r -d '\n' -n 500 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$db" del >/dev/null
    done
    [[ -z ${batch_db_ours:-} ]] || empty_batch_db
}
trap cleanup EXIT

if [[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$BATCH_REDIS_DB" dbsize) != 0 ]]; then
    echo "Redis database $BATCH_REDIS_DB is not empty; set BATCH_REDIS_DB to an empty one" >&2
    exit 1
fi
batch_db_ours=1
empty_batch_db() {
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$BATCH_REDIS_DB" flushdb >/dev/null
    psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS boxoffice_bench_batch WITH (FORCE)" 2>/dev/null
}

for db in boxoffice_bench boxoffice_bench_drain boxoffice_bench_batch; do
    psql "$PG/postgres" -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
done

start_server() { # consumer on/off [, Redis database, PostgreSQL URL]
    REDIS_URL=redis://$REDIS_HOST:$REDIS_PORT/${2:-0} \
    BOXOFFICE_LISTEN=127.0.0.1:$PORT DATABASE_URL=${3:-$DB_URL} BOXOFFICE_KEY_PREFIX=$PREFIX \
        ADMIN_TOKEN=$TOKEN BOXOFFICE_CONSUMER=$1 BOXOFFICE_LOG_FORMAT=json BOXOFFICE_PURCHASE_BATCH=${BATCH:-$CAP} \
        "$BIN/boxoffice" serve >>"$RAW/server.log" 2>&1 &
    server=$!
    pids+=("$server")
    for _ in $(seq 1 100); do
        curl -fs "localhost:$PORT/health/ready" >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "server did not become ready" >&2
    exit 1
}
stop_server() { kill "$server"; wait "$server" 2>/dev/null || true; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
new_event() { # name seats -> id
    curl -fs -X POST "localhost:$PORT/api/v1/events" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d "{\"name\":\"$1\",\"totalSeats\":$2}" | jq -r .id
}
rush() { # name, rush args... -> JSON in $RAW/name.json
    local name=$1
    shift
    "$BIN/rush" "$@" --url "http://127.0.0.1:$PORT" --json >"$RAW/$name.json"
}
field() { jq -r "$2" "$RAW/$1.json"; }
redis_cpu() { # seconds of CPU Redis has used, user + system
    redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" info cpu | tr -d '\r' |
        awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {printf "%.6f", s}'
}
measured() { # name, rush args... -> as rush, plus Redis' CPU seconds over the run in $RAW/name.cpu
    local name=$1 before
    before=$(redis_cpu)
    rush "$@"
    awk -v a="$before" -v b="$(redis_cpu)" 'BEGIN {printf "%.6f", b - a}' >"$RAW/$name.cpu"
}
used_memory() { redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }

echo "== server with consumer" >&2
start_server true
sleep 1
idle_rss=$(rss_kb "$server")
event=$(new_event bench 1000000)

echo "== framework ceiling: GET /health/live" >&2
rush live64 sustained --get /health/live -c 64 -d "$DURATION"
rush live256 sustained --get /health/live -c 256 -d "$DURATION"

echo "== purchases, closed model" >&2
rush buy64 sustained --event "$event" -c 64 -d "$DURATION" --database-url "$DB_URL"
rush buy256 sustained --event "$event" -c 256 -d "$DURATION" --database-url "$DB_URL"

echo "== purchases at fixed rates: 10,000/s (the target) and 5,000/s" >&2
rush rate10k sustained --event "$event" -c 64 -d "$DURATION" --rate 10000 --database-url "$DB_URL"
rush rate5k sustained --event "$event" -c 64 -d "$DURATION" --rate 5000 --database-url "$DB_URL"

echo "== seed scenario" >&2
seed_event=$(new_event seed 1000)
rush seed seed --event "$seed_event" --users 1000 --database-url "$DB_URL"

echo "== RSS over a ${SOAK}s run" >&2
rss_before=$(rss_kb "$server")
rush soak sustained --event "$event" -c 64 -d "${SOAK}s" --retry-share 0.05
rss_after=$(rss_kb "$server")
stop_server

echo "== persistence drain: $DRAIN_SEATS sales with the consumer paused" >&2
start_server false "$DRAIN_REDIS_DB" "$DRAIN_DB_URL"
drain_event=$(new_event drain "$DRAIN_SEATS")
mem_before=$(used_memory)
rush fill sustained --event "$drain_event" -c 64 -d 600s --requests "$DRAIN_SEATS"
drain_start=$(date +%s.%N)
REDIS_URL=redis://$REDIS_HOST:$REDIS_PORT/$DRAIN_REDIS_DB BOXOFFICE_INSTANCE_ID=bench-worker DATABASE_URL=$DRAIN_DB_URL BOXOFFICE_KEY_PREFIX=$PREFIX \
    BOXOFFICE_WORKER_LISTEN=127.0.0.1:0 BOXOFFICE_LOG_FORMAT=json "$BIN/boxoffice" worker >>"$RAW/worker.log" 2>&1 &
worker=$!
pids+=("$worker")
until [[ $(psql "$DRAIN_DB_URL" -qAtc "SELECT count(*) FROM purchases WHERE event_id = '$drain_event'") -ge $DRAIN_SEATS ]]; do
    sleep 0.05
done
drain_end=$(date +%s.%N)
# The consumer trims acknowledged entries once a second and when it falls idle.
until [[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" -n "$DRAIN_REDIS_DB" xlen "$PREFIX:{$drain_event}:log") -le 1 ]]; do
    sleep 0.1
done
mem_after=$(used_memory)
kill "$worker"
stop_server

echo "== recovery: $RECOVERY_SALES sales' records restored after Redis lost the event" >&2
start_server true
recovery_event=$(new_event recovery $((RECOVERY_SALES + 10)))
# Sales persisted earlier, straight into PostgreSQL; then the event's keys go, as
# after a FLUSHALL. The first purchase waits for the recovery.
psql "$DB_URL" -qc "INSERT INTO purchases (id, event_id, idempotency_key, quantity, seats_remaining, sold_at)
    SELECT gen_random_uuid(), '$recovery_event', 'rec-' || i, 1, $RECOVERY_SALES + 10 - i, now()
    FROM generate_series(1, $RECOVERY_SALES) AS i"
redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" del "$PREFIX:{$recovery_event}:inv" "$PREFIX:{$recovery_event}:log" >/dev/null
recovery_s=$(curl -fs -o /dev/null -w '%{time_total}' -X POST "localhost:$PORT/api/v1/events/$recovery_event/purchase" \
    -H 'Idempotency-Key: after-recovery' -H 'Content-Type: application/json' -d '{"quantity":1}')
recovered=$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "$PREFIX:{$recovery_event}:idem:rec-*" | wc -l)
stop_server

echo "== batching: one purchase per script call (cap 1) against coalesced (cap $CAP)" >&2
# Interleaved rounds: this machine's throughput drifts by ±10 % from one minute to
# the next, more than the difference sought between neighbouring runs.
for round in 1 2; do
    for cap in 1 "$CAP"; do
        BATCH=$cap start_server true "$BATCH_REDIS_DB" "$BATCH_DB_URL"
        measured "c64_cap${cap}_r$round" sustained --event "$(new_event c64 1000000)" -c 64 -d "$DURATION"
        measured "c256_cap${cap}_r$round" sustained --event "$(new_event c256 1000000)" -c 256 -d "$DURATION"
        stop_server
        empty_batch_db
    done
done
# p99 at a fixed rate of half what cap 1 sold at most, for both.
half_rate=$(jq -s '[.[].throughput_rps] | max / 2 / 100 | floor * 100' "$RAW"/c*_cap1_r*.json)
for cap in 1 "$CAP"; do
    BATCH=$cap start_server true "$BATCH_REDIS_DB" "$BATCH_DB_URL"
    measured "half_cap$cap" sustained --event "$(new_event half 1000000)" -c 256 -d "$DURATION" --rate "$half_rate"
    stop_server
    empty_batch_db
done

echo "== the curve: purchases/s and p99 against offered load" >&2
for cap in 1 "$CAP"; do
    BATCH=$cap start_server true "$BATCH_REDIS_DB" "$BATCH_DB_URL"
    for rate in $SWEEP; do
        measured "sweep_cap${cap}_$rate" sustained --event "$(new_event sweep 1000000)" -c 256 -d "$SWEEP_DURATION" --rate "$rate"
    done
    stop_server
    empty_batch_db
done

echo "== Redis ceiling: lua/purchase.lua driven straight against Redis, one event" >&2
"$BIN/rush" ceiling --redis-url "redis://$REDIS_HOST:$REDIS_PORT/$BATCH_REDIS_DB" --batch 1 -c 4 --in-flight 4 -d 5s --json >"$RAW/ceiling_1.json"
"$BIN/rush" ceiling --redis-url "redis://$REDIS_HOST:$REDIS_PORT/$BATCH_REDIS_DB" --batch "$CAP" -c 4 --in-flight 2 -d 5s --json >"$RAW/ceiling_$CAP.json"

# --- report ---
python3 - "$RAW" "$idle_rss" "$rss_before" "$rss_after" "$drain_start" "$drain_end" \
    "$DRAIN_SEATS" "$mem_before" "$mem_after" "$CAP" "$half_rate" "$SWEEP" \
    "$RECOVERY_SALES" "$recovery_s" "$recovered" >"$OUT/results.md" <<'PY'
import json, os, platform, subprocess, sys, datetime
raw, idle, rss0, rss1, d0, d1, n, m0, m1, cap, half_rate, sweep, rec_n, rec_s, rec_done = sys.argv[1:]
def run(name): return json.load(open(os.path.join(raw, name + ".json")))
def cpu():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"): return line.split(":", 1)[1].strip()
    return platform.processor()
live64, live256, buy64, buy256, rate, rate5k, seed = (run(x) for x in ("live64", "live256", "buy64", "buy256", "rate10k", "rate5k", "seed"))
soak, fill = run("soak"), run("fill")
drain_s = float(d1) - float(d0)
rows_per_s = int(n) / drain_s
per_purchase = (int(m1) - int(m0)) / int(n)
idle_mb, rss0_mb, rss1_mb = int(idle) / 1024, int(rss0) / 1024, int(rss1) / 1024
def ok(flag): return "met" if flag else "**missed**"
every_run = [json.load(open(os.path.join(raw, f))) for f in sorted(os.listdir(raw)) if f.endswith(".json") and not f.startswith("ceiling")]
checks = all(c["ok"] for r in every_run for c in r["checks"])
print(f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with `scripts/bench.sh` on {os.cpu_count()} cores ({cpu()}), "
      f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB; client, server, Redis and PostgreSQL on the same machine. "
      f"Every run's checks passed: {'yes' if checks else '**no**'}.")
print()
print("| figure | value | target | |")
print("| --- | --- | --- | --- |")
def row(name, value, target="", verdict=""): print(f"| {name} | {value} | {target} | {verdict} |")
row("`GET /health/live`, 64 connections", f"{live64['throughput_rps']:,.0f} req/s")
row("`GET /health/live`, 256 connections", f"{live256['throughput_rps']:,.0f} req/s")
for label, b, l in (("64", buy64, live64), ("256", buy256, live256)):
    ratio = b['throughput_rps'] / l['throughput_rps']
    row(f"purchases, {label} connections", f"{b['throughput_rps']:,.0f} req/s = {ratio:.0%} of live; p50 {b['latency_ms']['p50']:.2f} ms, p99 {b['latency_ms']['p99']:.2f} ms",
        "≥ 45 % of live", ok(ratio >= 0.45))
row("purchases at a fixed 10,000/s", f"achieved {rate['throughput_rps']:,.0f}/s; p50 {rate['latency_ms']['p50']:.2f}, p99 {rate['latency_ms']['p99']:.2f}, p99.9 {rate['latency_ms']['p999']:.2f}, max {rate['latency_ms']['max']:.2f} ms",
    "p99 ≤ 3 ms", ok(rate['latency_ms']['p99'] <= 3))
row("purchases at a fixed 5,000/s", f"achieved {rate5k['throughput_rps']:,.0f}/s; p50 {rate5k['latency_ms']['p50']:.2f}, p99 {rate5k['latency_ms']['p99']:.2f}, p99.9 {rate5k['latency_ms']['p999']:.2f}, max {rate5k['latency_ms']['max']:.2f} ms")
seed_ms = seed['duration_s'] * 1000
seed_fail = seed['requests'] - seed['statuses'].get('200', 0)
row("`rush seed`, 1,000 fresh connections", f"{seed_ms:.0f} ms, {seed_fail} failures", "≤ 250 ms, 0 failures", ok(seed_ms <= 250 and seed_fail == 0))
row("persistence drain", f"{int(n):,} rows in {drain_s:.2f} s = {rows_per_s:,.0f} rows/s", "≥ 50,000 rows/s", ok(rows_per_s >= 50000))
row("Redis memory per remembered purchase", f"{per_purchase:.0f} bytes", "≤ 250 bytes", ok(per_purchase <= 250))
row("idle RSS", f"{idle_mb:.1f} MB", "≤ 30 MB", ok(idle_mb <= 30))
row(f"RSS before / after a {soak['duration_s']:.0f} s run ({soak['throughput_rps']:,.0f} req/s)", f"{rss0_mb:.1f} → {rss1_mb:.1f} MB", "no growth", ok(rss1_mb <= rss0_mb * 1.1 + 1))
row(f"recovery of an event with {int(rec_n):,} sales (first purchase after its keys were lost)",
    f"{float(rec_s):.2f} s, {int(rec_done):,} records restored", "all records", ok(int(rec_done) == int(rec_n)))
print()
print(f"Ratios: purchases/live {buy64['throughput_rps']/live64['throughput_rps']:.2f} (64 conns), "
      f"{buy256['throughput_rps']/live256['throughput_rps']:.2f} (256).")

# --- batching: one purchase per script call (cap 1) against coalesced ---
def cpu_us(name, r):
    sold = r["statuses"].get("200", 0)
    return float(open(os.path.join(raw, name + ".cpu")).read()) * 1e6 / max(sold, 1)
print()
print(f"### One purchase per script call (cap 1) against coalesced (cap {cap})")
print()
print("Closed model, two interleaved rounds, the consumer on; Redis CPU is INFO cpu (user + sys) over the run ÷ purchases sold.")
print()
print("| connections | cap 1 purchases/s | cap 1 Redis CPU/purchase | coalesced purchases/s | coalesced Redis CPU/purchase | throughput ratio | CPU ratio |")
print("| --- | --- | --- | --- | --- | --- | --- |")
means = {}
for conns in (64, 256):
    cells = {}
    for c in ("1", cap):
        names = [f"c{conns}_cap{c}_r{r}" for r in (1, 2)]
        runs = [run(x) for x in names]
        rps = [x["throughput_rps"] for x in runs]
        cpu = [cpu_us(nm, x) for nm, x in zip(names, runs)]
        cells[c] = (sum(rps) / 2, sum(cpu) / 2, rps, cpu)
    one, many = cells["1"], cells[cap]
    means[conns] = (one, many)
    print(f"| {conns} | {' / '.join(f'{x:,.0f}' for x in one[2])} (mean {one[0]:,.0f}) | {' / '.join(f'{x:.1f}' for x in one[3])} µs "
          f"| {' / '.join(f'{x:,.0f}' for x in many[2])} (mean {many[0]:,.0f}) | {' / '.join(f'{x:.1f}' for x in many[3])} µs "
          f"| {many[0] / one[0]:.2f}× | {many[1] / one[1]:.2f} |")
one, many = means[256]
half1, halfn = run("half_cap1"), run(f"half_cap{cap}")
ceil1, ceiln = (json.load(open(os.path.join(raw, f"ceiling_{c}.json"))) for c in ("1", cap))
print()
print("| figure | value | target | |")
print("| --- | --- | --- | --- |")
best = max(means, key=lambda k: means[k][1][0] / means[k][0][0])
ratio = means[best][1][0] / means[best][0][0]
row(f"purchases/s, coalesced ÷ cap 1 ({best} connections, means)", f"{ratio:.2f}×", "≥ 1.3×", ok(ratio >= 1.3))
live_ratio = max(means[64][1][0] / live64["throughput_rps"], means[256][1][0] / live256["throughput_rps"])
row("purchases/s coalesced ÷ `/health/live` (same connections)", f"{means[64][1][0] / live64['throughput_rps']:.2f} (64), {means[256][1][0] / live256['throughput_rps']:.2f} (256)", "≥ 0.55", ok(live_ratio >= 0.55))
cpu_ratio = min(means[k][1][1] / means[k][0][1] for k in means)
row("Redis CPU per purchase, coalesced ÷ cap 1 (closed model)", f"{means[64][1][1] / means[64][0][1]:.2f} (64), {means[256][1][1] / means[256][0][1]:.2f} (256)", "≤ 0.25", ok(cpu_ratio <= 0.25))
for label, h in (("cap 1", half1), ("coalesced", halfn)):
    row(f"p99 at a fixed {int(half_rate):,}/s (half of cap 1's most), {label}",
        f"achieved {h['throughput_rps']:,.0f}/s; p50 {h['latency_ms']['p50']:.2f}, p99 {h['latency_ms']['p99']:.2f} ms; Redis CPU {cpu_us('half_cap1' if label == 'cap 1' else f'half_cap{cap}', h):.1f} µs/purchase",
        "coalesced ≤ cap 1" if label == "coalesced" else "", ok(halfn['latency_ms']['p99'] <= half1['latency_ms']['p99']) if label == "coalesced" else "")
row("Redis ceiling, one call per purchase (`rush ceiling --batch 1`)", f"{ceil1['sales_per_s']:,.0f} sales/s; Redis CPU {ceil1['redis_cpu_us_per_sale']:.2f} µs/sale")
row(f"Redis ceiling, {cap} purchases per call (`rush ceiling --batch {cap}`)", f"{ceiln['sales_per_s']:,.0f} sales/s; Redis CPU {ceiln['redis_cpu_us_per_sale']:.2f} µs/sale",
    "≥ 100,000 sales/s", ok(ceiln['sales_per_s'] >= 100000 and ceiln['counter_matches'] and ceiln['stream_matches']))

# --- the curve ---
rates = [int(r) for r in sweep.split()]
curve = {c: [run(f"sweep_cap{c}_{r}") for r in rates] for c in ("1", cap)}
print()
print("| offered/s | " + " | ".join(f"cap {c}: purchases/s, p99 ms, Redis µs/purchase" for c in ("1", cap)) + " |")
print("| --- | --- | --- |")
for i, r in enumerate(rates):
    cells = []
    for c in ("1", cap):
        x = curve[c][i]
        cells.append(f"{x['throughput_rps']:,.0f}, {x['latency_ms']['p99']:.2f}, {cpu_us(f'sweep_cap{c}_{r}', x):.1f}")
    print(f"| {r:,} | " + " | ".join(cells) + " |")

def svg(path):
    W, H, L, B, T, R = 760, 300, 70, 40, 30, 20
    colours = {"1": "#c0392b", cap: "#2471a3"}
    def panel(y0, title, values, ylabel, log):
        top = max(max(v) for v in values.values()) * 1.1
        lo = min(min(v) for v in values.values())
        import math
        def sy(v):
            if log:
                a, b = math.log10(max(lo, 0.01) / 1.5), math.log10(top)
                return y0 + T + (H - T - B) * (1 - (math.log10(max(v, 0.01)) - a) / (b - a))
            return y0 + T + (H - T - B) * (1 - v / top)
        xmax = rates[-1] * 1.05
        sx = lambda v: L + (W - L - R) * v / xmax
        out = [f'<text x="{W/2}" y="{y0 + 18}" text-anchor="middle" font-size="14">{title}</text>',
               f'<line x1="{L}" y1="{y0 + H - B}" x2="{W - R}" y2="{y0 + H - B}" stroke="#333"/>',
               f'<line x1="{L}" y1="{y0 + T}" x2="{L}" y2="{y0 + H - B}" stroke="#333"/>',
               f'<text x="{W/2}" y="{y0 + H - 6}" text-anchor="middle" font-size="12">offered purchases/s</text>',
               f'<text x="16" y="{y0 + H/2}" text-anchor="middle" font-size="12" transform="rotate(-90 16 {y0 + H/2})">{ylabel}</text>']
        for r in rates:
            out.append(f'<text x="{sx(r):.1f}" y="{y0 + H - B + 14}" text-anchor="middle" font-size="10">{r // 1000}k</text>')
        step = next(s for s in (1000, 2000, 5000, 10000, 20000, 50000) if top / s <= 8)
        ticks = [t for t in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000) if lo / 1.5 <= t <= top] if log \
            else [step * i for i in range(int(top // step) + 1)]
        for t in ticks:
            out.append(f'<line x1="{L - 4}" y1="{sy(t):.1f}" x2="{W - R}" y2="{sy(t):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{L - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{t:,.0f}</text>' if t >= 1 or not log else
                       f'<text x="{L - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" font-size="10">{t}</text>')
        if not log:
            edge = min(rates[-1], top)
            out.append(f'<line x1="{sx(0)}" y1="{sy(0)}" x2="{sx(edge)}" y2="{sy(edge)}" stroke="#999" stroke-dasharray="4 4"/>')
        for c, v in values.items():
            pts = " ".join(f"{sx(r):.1f},{sy(y):.1f}" for r, y in zip(rates, v))
            out.append(f'<polyline fill="none" stroke="{colours[c]}" stroke-width="2" points="{pts}"/>')
            out += [f'<circle cx="{sx(r):.1f}" cy="{sy(y):.1f}" r="3" fill="{colours[c]}"/>' for r, y in zip(rates, v)]
        return out
    body = panel(0, "Purchases/s achieved (dashed: all offered)", {c: [x["throughput_rps"] for x in curve[c]] for c in curve}, "purchases/s", False)
    body += panel(H, "p99 latency, ms (log scale)", {c: [x["latency_ms"]["p99"] for x in curve[c]] for c in curve}, "p99 ms", True)
    legend = [f'<rect x="{L + 10}" y="{H * 2 + 6}" width="12" height="12" fill="{colours["1"]}"/>',
              f'<text x="{L + 28}" y="{H * 2 + 16}" font-size="12">cap 1: one purchase per script call</text>',
              f'<rect x="{L + 300}" y="{H * 2 + 6}" width="12" height="12" fill="{colours[cap]}"/>',
              f'<text x="{L + 318}" y="{H * 2 + 16}" font-size="12">coalesced: up to {cap} per call</text>']
    with open(path, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H * 2 + 26}" font-family="sans-serif">'
                f'<rect width="100%" height="100%" fill="white"/>' + "".join(body + legend) + "</svg>\n")
svg(os.path.join(os.path.dirname(raw), "batching.svg"))
print()
print("Picture: bench/batching.svg.")
PY
cat "$OUT/results.md"
