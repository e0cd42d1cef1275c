#!/usr/bin/env bash
# Builds local stand-ins for the container images this project names, for a Docker
# engine that cannot pull them (an air-gapped machine, or one that reaches only the
# Debian mirror). Each is tagged with the exact name the project's files use, so
# `docker build`, `docker compose` and the testcontainers tests run unchanged:
#
#   rust:1.95-slim-bookworm              this machine's Rust toolchain on Debian bookworm
#   gcr.io/distroless/cc-debian12:nonroot  glibc, libgcc and CA certificates, user 65532
#   redis:7.2-alpine                     Debian's redis-server (7.0)
#   postgres:16-alpine                   Debian's PostgreSQL (15), entrypoint honouring
#                                        POSTGRES_USER/PASSWORD/DB like the official one
#   nginx:1.27-alpine                    Debian's nginx (1.22)
#   node:20-bookworm-slim                this machine's Node.js (20) and npm, which reach
#                                        the npm registry the way this machine does
#
# Images that already exist are left alone (pulled official ones included), so the
# script is safe to run on any machine. The base is a `debootstrap --variant=minbase`
# of bookworm from the mirror apt uses (about a minute), cached as a tarball in
# $BOXOFFICE_OFFLINE_CACHE (default ~/.cache/boxoffice-offline).
#
#   scripts/offline-images.sh          # needs root (debootstrap), docker, debootstrap
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${BOXOFFICE_OFFLINE_CACHE:-$HOME/.cache/boxoffice-offline}
BASE=boxoffice-offline/debian:bookworm
export DOCKER_BUILDKIT=0 # the legacy builder needs no frontend image from a registry

have() { docker image inspect "$1" >/dev/null 2>&1; }
step() { printf '== %s\n' "$*" >&2; }

mirror() {
    local uri
    uri=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        grep -v security | head -n 1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

base_image() {
    have "$BASE" && return
    mkdir -p "$CACHE"
    local tarball=$CACHE/bookworm-minbase.tar
    if [[ ! -s $tarball ]]; then
        step "debootstrap bookworm from $(mirror)"
        local root
        root=$(mktemp -d)
        debootstrap --variant=minbase bookworm "$root" "$(mirror)" >"$CACHE/debootstrap.log" 2>&1 ||
            { tail -n 20 "$CACHE/debootstrap.log" >&2; exit 1; }
        rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
        tar -C "$root" -cf "$tarball.part" .
        mv "$tarball.part" "$tarball"
        rm -rf "$root"
    fi
    step "import $BASE"
    docker import "$tarball" "$BASE" >/dev/null
}

# Builds image $1 from a Dockerfile on stdin, with the context directory $2.
build() {
    local name=$1 context=$2 log
    step "build $name"
    log=$(mktemp)
    docker build -q -t "$name" -f - "$context" >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; return 1; }
    rm -f "$log"
}

rust_image() {
    local name=rust:1.95-slim-bookworm
    have "$name" && return
    local sysroot context
    sysroot=$(rustc --print sysroot)
    context=$(mktemp -d)
    # The toolchain without its documentation, and the CA certificates this machine
    # trusts: cargo in the build reaches the registry the way this machine does.
    tar -C "$sysroot" --exclude=./share -cf - . | (mkdir "$context/rust" && tar -C "$context/rust" -xf -)
    cp /etc/ssl/certs/ca-certificates.crt "$context/"
    build "$name" "$context" <<DOCKERFILE
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\
    && rm -rf /var/lib/apt/lists/*
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY rust /usr/local/rust
ENV CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DOCKERFILE
    rm -rf "$context"
}

distroless_image() {
    local name=gcr.io/distroless/cc-debian12:nonroot
    have "$name" && return
    # Files of glibc, libgcc, CA certificates and time zones, at their merged-/usr
    # paths (Debian's package lists still name /lib), with the usual symlinks.
    build "$name" "$(mktemp -d)" <<DOCKERFILE
FROM $BASE AS files
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates tzdata \\
    && mkdir -p /out/etc /out/tmp /out/home/nonroot \\
    && for d in bin sbin lib lib64; do ln -s usr/\$d /out/\$d; done \\
    && dpkg -L libc6 libgcc-s1 ca-certificates tzdata | sed -e 's#^/lib#/usr/lib#' \\
       | while read -r f; do if [ -f "\$f" ] || [ -L "\$f" ]; then echo "\${f#/}"; fi; done >/tmp/files \\
    && tar -C / -cf - -T /tmp/files | tar -C /out -xf - \\
    && cp -a /etc/ssl /out/etc/ \\
    && printf 'root:x:0:0:root:/root:/sbin/nologin\\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\\n' >/out/etc/passwd \\
    && printf 'root:x:0:\\nnonroot:x:65532:\\n' >/out/etc/group \\
    && chmod 1777 /out/tmp && chown 65532:65532 /out/home/nonroot
FROM scratch
COPY --from=files /out /
USER 65532:65532
WORKDIR /home/nonroot
DOCKERFILE
}

redis_image() {
    local name=redis:7.2-alpine context
    have "$name" && return
    context=$(mktemp -d)
    # As the official image: data in /data, protected mode off (the network is the
    # boundary), logs on stdout, any arguments after `redis-server` passed through.
    cat >"$context/entrypoint.sh" <<'SH'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- redis-server "$@"; fi
if [ "$1" = redis-server ]; then
    shift
    set -- redis-server --protected-mode no --dir /data "$@"
fi
exec "$@"
SH
    build "$name" "$context" <<DOCKERFILE
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \\
    && rm -rf /var/lib/apt/lists/* && mkdir /data && chown redis:redis /data
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
DOCKERFILE
    rm -rf "$context"
}

postgres_image() {
    local name=postgres:16-alpine context
    have "$name" && return
    context=$(mktemp -d)
    # What the project uses of the official entrypoint: POSTGRES_USER, _PASSWORD,
    # _DB and _HOST_AUTH_METHOD on first start, *.sql in /docker-entrypoint-initdb.d,
    # arguments starting with `-` passed to postgres. Like the official image it logs
    # "database system is ready to accept connections" on stdout (the temporary
    # server of the first start) and on stderr (the real one): testcontainers waits
    # for both.
    cat >"$context/entrypoint.sh" <<'SH'
#!/bin/sh
set -e
if [ "${1#-}" != "$1" ]; then set -- postgres "$@"; fi
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown -R postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi
if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    user=${POSTGRES_USER:-postgres}
    db=${POSTGRES_DB:-$user}
    method=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
    if [ -z "$POSTGRES_PASSWORD" ] && [ "$method" != trust ]; then
        echo "POSTGRES_PASSWORD is not set (or set POSTGRES_HOST_AUTH_METHOD=trust)" >&2
        exit 1
    fi
    printf '%s' "${POSTGRES_PASSWORD:-}" >/tmp/pwfile
    initdb --username="$user" --pwfile=/tmp/pwfile --auth-local=trust --auth-host="$method" \
        --encoding=UTF8 -D "$PGDATA" >/dev/null
    rm -f /tmp/pwfile
    echo "host all all all $method" >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$db" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$user" --dbname postgres \
            -c "CREATE DATABASE \"$db\""
    fi
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$f" ] && psql -v ON_ERROR_STOP=1 --username "$user" --dbname "$db" -f "$f"
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
fi
exec "$@"
SH
    build "$name" "$context" <<DOCKERFILE
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15 \\
    && rm -rf /var/lib/apt/lists/* && mkdir /docker-entrypoint-initdb.d
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod 755 /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PGDATA=/var/lib/postgresql/data
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
DOCKERFILE
    rm -rf "$context"
}

nginx_image() {
    local name=nginx:1.27-alpine
    have "$name" && return
    # As the official image: /etc/nginx/conf.d/*.conf is the site, workers run as
    # `nginx`, logs go to the container's output, nginx stays in the foreground.
    build "$name" "$(mktemp -d)" <<DOCKERFILE
FROM $BASE
RUN apt-get update && apt-get install -y --no-install-recommends nginx-light \\
    && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \\
    && useradd --system --no-create-home --shell /usr/sbin/nologin nginx \\
    && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
DOCKERFILE
}

node_image() {
    local name=node:20-bookworm-slim context node npm
    have "$name" && return
    node=$(command -v node || true)
    npm=$(dirname "$(realpath "$(command -v npm || echo /nonexistent)")")/..
    if [[ -z $node || ! -f $npm/package.json ]] || ! "$node" -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)'; then
        echo "node:20-bookworm-slim needs Node.js >= 20 and npm on this machine" >&2
        return 1
    fi
    context=$(mktemp -d)
    cp "$(realpath "$node")" "$context/node"
    cp -r "$(realpath "$npm")" "$context/npm"
    cp /etc/ssl/certs/ca-certificates.crt "$context/"
    build "$name" "$context" <<DOCKERFILE
FROM $BASE
COPY node /usr/local/bin/node
COPY npm /usr/local/lib/node_modules/npm
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
CMD ["node"]
DOCKERFILE
    rm -rf "$context"
}

command -v docker >/dev/null || { echo "docker is needed" >&2; exit 1; }
if ! have "$BASE"; then
    missing=0
    for image in rust:1.95-slim-bookworm gcr.io/distroless/cc-debian12:nonroot \
        redis:7.2-alpine postgres:16-alpine nginx:1.27-alpine node:20-bookworm-slim; do
        have "$image" || missing=1
    done
    ((missing)) || exit 0
    command -v debootstrap >/dev/null || { echo "debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
    base_image
fi
rust_image
distroless_image
redis_image
postgres_image
nginx_image
node_image
docker image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E '^(rust|gcr.io|redis|postgres|nginx|node|boxoffice)' >&2
