#!/usr/bin/env bash
# Every Docker path, for real: builds the image, runs the compose stack (3 replicas,
# then 5) and sells through its nginx, kills a replica mid-rush, runs it again on a
# Redis Cluster (deploy/compose/redis-cluster.yml) and sells, tears it all down,
# then runs the integration tests on testcontainers. Run by CI; runs anywhere with a
# Docker engine (it starts one, and installs Debian's, when there is none).
#
#   scripts/docker-test.sh
#
# Images the engine cannot pull are built locally first (scripts/offline-images.sh).
# Uses the compose project `boxoffice-ci` and port 3000; removes what it created.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=boxoffice-ci
TOKEN=docker-test-$$-admin-token-of-32-bytes
RUSH=${RUSH:-target/debug/rush}
started_at=$(date +%s)
log=$(mktemp)
step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - started_at))"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose -p "$PROJECT" "$@"
    else
        docker-compose -p "$PROJECT" "$@"
    fi
}

engine() {
    if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null ||
        ! { docker compose version || command -v docker-compose; } >/dev/null 2>&1 ||
        ! command -v debootstrap >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker.io docker-compose debootstrap iptables >/dev/null
    fi
    docker info >/dev/null 2>&1 && return
    # Published ports through iptables rather than a proxy process per port: the
    # testcontainers run takes 88 s instead of 208 s here.
    dockerd --userland-proxy=false >/var/log/boxoffice-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 1 60); do
        docker info >/dev/null 2>&1 && return
        sleep 0.5
    done
    fail "dockerd did not start; see /var/log/boxoffice-dockerd.log"
}

cleanup() {
    rm -f "$log"
    on_cluster down -v --remove-orphans >/dev/null 2>&1 || true
    if [[ -n ${dockerd_pid:-} ]]; then
        kill "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

# The stack on a Redis Cluster: the main file with the cluster's layered over it.
on_cluster() { compose -f docker-compose.yml -f deploy/compose/redis-cluster.yml "$@"; }

container_ip() { docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$1"; }
app_containers() { compose ps -q app; }

wait_healthy() { # count
    for _ in $(seq 1 90); do
        local healthy=0
        for id in $(app_containers); do
            [[ $(docker inspect -f '{{.State.Health.Status}}' "$id") == healthy ]] && healthy=$((healthy + 1))
        done
        ((healthy >= $1)) && { echo "$healthy app containers healthy"; return; }
        sleep 1
    done
    fail "fewer than $1 app containers became healthy"
}

new_event() { # name seats
    curl -fs -X POST localhost:3000/api/v1/events -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' -d "{\"name\":\"$1\",\"totalSeats\":$2}" | jq -r .id
}

step "Docker engine"
engine
docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}'

step "images the engine cannot pull: scripts/offline-images.sh"
scripts/offline-images.sh

step "docker build (both stages of the Dockerfile)"
build_started=$(date +%s)
DOCKER_BUILDKIT=0 docker build -q -t boxoffice:local . >"$log" 2>&1 || { cat "$log"; fail "docker build"; }
echo "built boxoffice:local in $(($(date +%s) - build_started)) s," \
    "$(docker image inspect -f '{{.Size}}' boxoffice:local | awk '{printf "%.1f MB", $1 / 1e6}')"
user=$(docker image inspect -f '{{.Config.User}}' boxoffice:local)
[[ -n $user && $user != root && $user != 0* ]] || fail "the image runs as root ($user)"
echo "runs as $user; HEALTHCHECK: $(docker image inspect -f '{{json .Config.Healthcheck.Test}}' boxoffice:local)"

step "docker build deploy/nginx/Dockerfile (nginx with the buyer's page built by npm)"
build_started=$(date +%s)
DOCKER_BUILDKIT=0 docker build -q -t boxoffice-nginx:local -f deploy/nginx/Dockerfile . >"$log" 2>&1 ||
    { cat "$log"; fail "docker build of the nginx image"; }
echo "built boxoffice-nginx:local in $(($(date +%s) - build_started)) s"

step "docker compose up: Redis, PostgreSQL, migration, 3 replicas, nginx on :3000"
compose down -v --remove-orphans >/dev/null 2>&1 || true
ADMIN_TOKEN=$TOKEN compose up -d
wait_healthy 3
for _ in $(seq 1 60); do curl -fs localhost:3000/health/ready >/dev/null && break; sleep 0.5; done
database="postgres://boxoffice:boxoffice@$(container_ip "$(compose ps -q postgres)"):5432/boxoffice"

step "the buyer's page at /shop/, beside the API"
curl -fs localhost:3000/shop/ >"$log" || fail "GET /shop/"
grep -q 'id="event-name"' "$log" || fail "/shop/ is not the storefront page"
bundle=$(grep -oE '/shop/assets/[^"]+\.js' "$log" | head -n 1)
type=$(curl -fs -o /dev/null -w '%{content_type}' "localhost:3000$bundle") || fail "GET $bundle"
[[ $type == text/javascript* ]] || fail "$bundle served as '$type'"
echo "/shop/ serves the page; $bundle as $type"

step "rush seed through nginx, verified against PostgreSQL"
"$RUSH" seed --url http://127.0.0.1:3000 --event "$(new_event seed 1000)" --users 1000 \
    --database-url "$database"

step "--scale app=5: every replica answers"
ADMIN_TOKEN=$TOKEN compose up -d --scale app=5
wait_healthy 5
sleep 6 # nginx caches Docker's answer for `app` for 5 s
answers=$(for _ in $(seq 1 200); do
    curl -fs -o /dev/null -D - localhost:3000/api/v1/event | tr -d '\r' | awk -F': ' 'tolower($1) == "x-upstream" {print $2}'
done | sort | uniq -c)
echo "$answers"
[[ $(echo "$answers" | wc -l) -eq 5 ]] || fail "not every one of 5 replicas answered"

step "docker kill one replica mid-rush; buyers retry with their keys"
event=$(new_event kill 1000000)
victim=$(app_containers | head -n 1)
(sleep 2 && docker kill "$victim" >/dev/null && echo "killed $victim at 2 s") &
killer=$!
"$RUSH" sustained --url http://127.0.0.1:3000 --event "$event" -c 16 -d 6s --retry-failed 20 \
    --database-url "$database"
wait "$killer"

step "docker compose with deploy/compose/redis-cluster.yml: a six-node Redis Cluster, sold through nginx"
compose down -v --remove-orphans
ADMIN_TOKEN=$TOKEN on_cluster up -d
wait_healthy 3
for _ in $(seq 1 60); do curl -fs localhost:3000/health/ready >/dev/null && break; sleep 0.5; done
on_cluster exec -T redis-node-0 redis-cli cluster info | grep -E 'cluster_(state|size|known_nodes)'
database="postgres://boxoffice:boxoffice@$(container_ip "$(compose ps -q postgres)"):5432/boxoffice"
for name in one two three; do
    "$RUSH" seed --url http://127.0.0.1:3000 --event "$(new_event "cluster $name" 300)" --users 300 \
        --database-url "$database"
done

step "docker compose down -v leaves nothing behind"
on_cluster down -v --remove-orphans
left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT"; docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT")
[[ -z $left ]] || fail "left behind: $left"
echo "no containers or volumes of $PROJECT left"

step "cargo test on testcontainers (local services ignored)"
before=$(docker ps -aq | wc -l)
BOXOFFICE_TEST_CONTAINERS=1 cargo test -- --skip faults:: --skip recovery::
after=$(docker ps -aq | wc -l)
((after == before)) || fail "the tests left $((after - before)) containers behind"
echo "containers removed after the tests"

step "Docker stage passed"
