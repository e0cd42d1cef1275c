#!/usr/bin/env bash
# A local fleet on loopback, the production topology: N `boxoffice serve` replicas on
# their own ports and a real nginx in front of them, with the same routes file as
# docker-compose (deploy/nginx/boxoffice.conf); only the upstream list differs.
#
#   scripts/fleet.sh up [N]     # default 3 replicas; nginx on 127.0.0.1:$FLEET_PORT (3000)
#   scripts/fleet.sh status
#   scripts/fleet.sh down
#
# Replicas read REDIS_URL, DATABASE_URL, ADMIN_TOKEN, BOXOFFICE_KEY_PREFIX, ... from
# the environment like `boxoffice serve`. State (pids, logs, nginx.conf) goes to
# $FLEET_DIR (target/fleet). Uses target/release/boxoffice, building it if missing.
# The buyer's page (examples/storefront) is served at /shop/, built with npm if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${FLEET_DIR:-target/fleet}
PORT=${FLEET_PORT:-3000}
BASE=${FLEET_BASE_PORT:-3101}
BIN=${FLEET_BIN:-target/release/boxoffice}

replica_ports() { ls "$DIR"/app-*.port 2>/dev/null | xargs -r cat; }

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_ready() { # port
    for _ in $(seq 1 150); do
        curl -fs "127.0.0.1:$1/health/ready" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "replica on port $1 did not become ready (see $DIR/app-*.log)" >&2
    return 1
}

# The buyer's page at /shop/, built once with npm (skipped, with a note, without it).
build_shop() {
    if ! command -v npm >/dev/null; then
        echo "npm is not installed: /shop/ will answer 404 (see examples/storefront)" >&2
        return
    fi
    (cd examples/storefront && npm ci --no-audit --no-fund --loglevel=error && npm run -s build) >"$DIR/shop-build.log" 2>&1 ||
        { cat "$DIR/shop-build.log" >&2; exit 1; }
}

up() {
    local n=${1:-3}
    if ! command -v nginx >/dev/null; then
        echo "nginx is not installed. On Debian: apt-get install nginx-light" >&2
        exit 1
    fi
    if alive "$DIR/nginx.pid"; then
        echo "a fleet is already up; run '$0 down' first" >&2
        exit 1
    fi
    [[ -x $BIN ]] || cargo build --release --bin boxoffice
    mkdir -p "$DIR"
    rm -f "$DIR"/app-*.pid "$DIR"/app-*.port
    local servers=""
    for i in $(seq 1 "$n"); do
        local port=$((BASE + i - 1))
        BOXOFFICE_LISTEN=127.0.0.1:$port BOXOFFICE_INSTANCE_ID=${BOXOFFICE_INSTANCE_ID:-fleet}-$i \
            "$BIN" serve >>"$DIR/app-$i.log" 2>&1 &
        echo $! >"$DIR/app-$i.pid"
        echo "$port" >"$DIR/app-$i.port"
        servers+="    server 127.0.0.1:$port max_fails=1 fail_timeout=2s;"$'\n'
    done
    for port in $(replica_ports); do wait_ready "$port"; done

    local routes
    routes=$(realpath deploy/nginx/boxoffice.conf)
    local state
    state=$(realpath "$DIR")
    local shop
    shop=$(realpath examples/storefront)/dist
    [[ -f $shop/shop/index.html ]] || build_shop
    # storefront.conf includes it from the configuration's directory, this one.
    cp deploy/nginx/security-headers.conf "$DIR/"
    cat >"$DIR/nginx.conf" <<CONF
# Rendered by scripts/fleet.sh; the routes are deploy/nginx/boxoffice.conf.
pid $state/nginx.pid;
error_log $state/nginx-error.log warn;
worker_processes 1;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $state/tmp;
    proxy_temp_path $state/tmp;
    fastcgi_temp_path $state/tmp;
    uwsgi_temp_path $state/tmp;
    scgi_temp_path $state/tmp;
    map \$http_x_request_id \$boxoffice_request_id {
        default \$http_x_request_id;
        ""      \$request_id;
    }
    upstream boxoffice {
        zone boxoffice 64k;
$servers        keepalive 64;
        keepalive_timeout 5s;
    }
    server {
        listen 127.0.0.1:$PORT backlog=4096;
        set \$boxoffice_backend boxoffice;
        include $routes;
        root $shop;
        include $(realpath deploy/nginx/storefront.conf);
    }
}
CONF
    mkdir -p "$DIR/tmp"
    nginx -q -c "$state/nginx.conf" -p "$state"
    wait_ready "$PORT"
    status
}

status() {
    local up=0
    for pidfile in "$DIR"/app-*.pid; do
        [[ -f $pidfile ]] || continue
        local i=${pidfile##*/app-}
        i=${i%.pid}
        local port
        port=$(cat "$DIR/app-$i.port")
        if alive "$pidfile"; then
            local ready
            ready=$(curl -s -o /dev/null -w '%{http_code}' "127.0.0.1:$port/health/ready" || true)
            echo "replica $i: pid $(cat "$pidfile"), 127.0.0.1:$port, ready $ready"
            up=$((up + 1))
        else
            echo "replica $i: down"
        fi
    done
    if alive "$DIR/nginx.pid"; then
        echo "nginx: pid $(cat "$DIR/nginx.pid"), http://127.0.0.1:$PORT"
    else
        echo "nginx: down"
    fi
    [[ $up -gt 0 ]]
}

down() {
    if alive "$DIR/nginx.pid"; then
        kill "$(cat "$DIR/nginx.pid")"
    fi
    for pidfile in "$DIR"/app-*.pid; do
        [[ -f $pidfile ]] || continue
        if alive "$pidfile"; then kill "$(cat "$pidfile")"; fi
    done
    # Replicas drain for BOXOFFICE_SHUTDOWN_DRAIN_MS, then exit.
    for pidfile in "$DIR"/app-*.pid; do
        [[ -f $pidfile ]] || continue
        for _ in $(seq 1 100); do alive "$pidfile" || break; sleep 0.1; done
    done
    rm -f "$DIR"/app-*.pid "$DIR"/app-*.port "$DIR/nginx.pid"
    echo "fleet is down"
}

case "${1:-}" in
    up) up "${2:-3}" ;;
    down) down ;;
    status) status ;;
    *)
        echo "usage: $0 up [N] | status | down" >&2
        exit 2
        ;;
esac
