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

echo "hadolint Dockerfile"
hadolint Dockerfile

echo "docker-compose.yml against the Compose specification"
check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

echo "k8s/ rendered by kustomize, against Kubernetes schemas (strict)"
kubectl kustomize k8s/ | kubernetes-validate --strict --quiet -

# nginx -t resolves every upstream name, and `app` exists only inside compose's
# network: render the compose config for loopback, then test it with the real
# shared routes file. The `resolve` parameter needs nginx >= 1.27.3 (the compose
# image); older nginx (Debian's) gets the plain form.
echo "nginx -t on deploy/nginx (compose config rendered for loopback)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp deploy/nginx/boxoffice.conf "$work/boxoffice.conf"
sed -e 's|^resolver .*||' \
    -e 's|server app:3000 resolve;|server 127.0.0.1:3000;|' \
    -e "s|/etc/nginx/boxoffice.conf|$work/boxoffice.conf|" \
    deploy/nginx/compose.conf >"$work/site.conf"
cat >"$work/nginx.conf" <<CONF
pid $work/nginx.pid;
error_log stderr;
events {}
http {
    access_log off;
    client_body_temp_path $work;
    proxy_temp_path $work;
    fastcgi_temp_path $work;
    uwsgi_temp_path $work;
    scgi_temp_path $work;
    include $work/site.conf;
}
CONF
nginx -t -q -c "$work/nginx.conf" -p "$work"
echo "deployment files: all checks passed"
