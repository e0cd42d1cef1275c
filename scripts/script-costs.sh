#!/usr/bin/env bash
# What each command of lua/purchase.lua costs inside a script, on this Redis: one
# EVAL runs a command 20,000 times in a loop; the time of an empty loop of the same
# length (the call itself, the round trip) is subtracted. These are the per-sale
# costs that batching cannot share out: one SET with a TTL and one XADD per sale.
#
#   scripts/script-costs.sh            # Redis on 127.0.0.1:6379
#   REDIS_PORT=6380 scripts/script-costs.sh
#
# Uses keys under its own prefix and deletes them.
set -euo pipefail

HOST=${REDIS_HOST:-127.0.0.1}
PORT=${REDIS_PORT:-6379}
N=20000
P="script-costs-$$"
cli() { redis-cli -h "$HOST" -p "$PORT" "$@"; }
clean() { cli --scan --pattern "$P:*" | xargs -r -n 1000 redis-cli -h "$HOST" -p "$PORT" unlink >/dev/null; }
trap clean EXIT

nanos() { # script -> ns for the whole EVAL, best of 3
    local best=0
    for _ in 1 2 3; do
        clean
        local start end
        start=$(date +%s%N)
        cli eval "$1" 0 "$P" "$N" >/dev/null
        end=$(date +%s%N)
        ((best == 0 || end - start < best)) && best=$((end - start))
    done
    echo "$best"
}

empty=$(nanos "for i = 1, ARGV[2] do end")
row() { # label, loop body (i is the loop index, ARGV[1] the key prefix)
    local total
    total=$(nanos "for i = 1, ARGV[2] do $2 end")
    printf '| %s | %.2f µs |\n' "$1" "$(echo "($total - $empty) / $N / 1000" | bc -l)"
}

echo "Redis $(cli info server | tr -d '\r' | awk -F: '/^redis_version:/ {print $2}'), $N iterations each, an empty loop subtracted"
echo
echo "| in a script, per call | time |"
echo "| --- | --- |"
row "build a key name (string concatenation)" "local k = ARGV[1] .. ':k' .. i"
row "build a record ('S1:4999:' .. id)" "local r = 'S' .. 1 .. ':' .. (99999 - i) .. ':0123456789abcdef0123456789abcdef'"
row "GET of a missing key (key name built)" "redis.call('GET', ARGV[1] .. ':k' .. i)"
row "SET of a new key, no TTL (key name built)" "redis.call('SET', ARGV[1] .. ':k' .. i, 'S1:12345:0123456789abcdef0123456789abcdef')"
row "SET of a new key with EX (key name built)" "redis.call('SET', ARGV[1] .. ':k' .. i, 'S1:12345:0123456789abcdef0123456789abcdef', 'EX', 600)"
row "XADD of a sale's 5 fields" "redis.call('XADD', ARGV[1] .. ':s', '*', 'p', '0123456789abcdef0123456789abcdef', 'k', 'rush-abc-1', 'q', 1, 'r', 99999, 't', '1700000000000000')"
row "HSET of 3 counters" "redis.call('HSET', ARGV[1] .. ':h', 'sold', i, 'purchases', i, 'rejected', 0)"
row "TIME" "redis.call('TIME')"
row "INFO server (the run id check)" "redis.call('INFO', 'server')"
