#!/usr/bin/env bash
# End-to-end check of the Docker engine with the test image: everything dso's rotator tests
# rely on. Needs ensure_docker and build-test-image.sh first. Cleans up what it creates.
#
#   bash .ci/docker-selftest.sh
set -euo pipefail

image=${DSO_TESTSRV_IMAGE:-dso-testsrv:test}
name=dso-selftest-$$
net=dso-selftest-$$
dir=$(mktemp -d)

log() { printf '[docker-selftest] %s\n' "$*" >&2; }
fail() {
    log "FAILED: $*"
    docker logs "$name" 2>&1 | tail -n 20 >&2 || true
    exit 1
}
cleanup() {
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker network rm "$net" >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

# A free loopback port for the published echo port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

printf 's3cr3t' >"$dir/db_password"
chmod 0440 "$dir/db_password"
chown 1234:5678 "$dir/db_password"

docker network create "$net" >/dev/null
docker run -d --name "$name" --network "$net" -p "127.0.0.1:$port:8080" \
    --tmpfs /run/tmp:size=1m,mode=0700 -v "$dir:/run/dso:ro" -e DB_USER=alice \
    "$image" >/dev/null
log "started $name on network $net, published 127.0.0.1:$port"

ip=$(docker inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$name")
cid=$(docker inspect -f '{{.Id}}' "$name")
log "container ip $ip, id ${cid:0:12}"

# The greeting names the container (its hostname is the short id).
greet() { timeout 5 bash -c "exec 3<>/dev/tcp/$1/$2; head -n1 <&3"; }
[ "$(greet "$ip" 8080)" = "dso-testsrv ${cid:0:12}" ] || fail "greeting over container ip"
[ "$(greet 127.0.0.1 "$port")" = "dso-testsrv ${cid:0:12}" ] || fail "greeting over published port"
log "ok: echo greeting over container ip and published port"

for _ in $(seq 50); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ] && break
    sleep 0.2
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$name")" = healthy ] || fail "HEALTHCHECK never healthy"
log "ok: HEALTHCHECK healthy"

docker exec "$name" /dso-testsrv probe 127.0.0.1:8081/health >/dev/null || fail "exec probe"
curl -fsS -X POST "http://$ip:8081/health/fail" >/dev/null
if docker exec "$name" /dso-testsrv probe 127.0.0.1:8081/health >/dev/null; then fail "exec probe after /health/fail"; fi
curl -fsS -X POST "http://$ip:8081/health/ok" >/dev/null
log "ok: docker exec probe gives the real exit code"

[ "$(curl -fsS "http://$ip:8081/env/DB_USER")" = alice ] || fail "env"
[ "$(curl -fsS "http://$ip:8081/file?path=/run/dso/db_password")" = s3cr3t ] || fail "bind-mounted file"
[ "$(curl -fsS "http://$ip:8081/stat?path=/run/dso/db_password")" = "mode=0440 uid=1234 gid=5678 size=6" ] ||
    fail "file mode/uid/gid through bind mount"
[ "$(curl -fsS "http://$ip:8081/stat?path=/run/tmp")" = "mode=0700 uid=0 gid=0 size=40" ] ||
    fail "tmpfs mount: $(curl -sS "http://$ip:8081/stat?path=/run/tmp")"
log "ok: env, read-only bind mount (content, mode, uid, gid), tmpfs"

docker kill -s HUP "$name" >/dev/null
sleep 0.3
[ "$(curl -fsS "http://$ip:8081/reloads")" = 1 ] || fail "SIGHUP reload counter"
log "ok: SIGHUP counted"

start=$(date +%s%N)
docker stop -t 10 "$name" >/dev/null
ms=$((($(date +%s%N) - start) / 1000000))
[ "$ms" -lt 3000 ] || fail "docker stop took ${ms}ms (SIGTERM ignored?)"
[ "$(docker inspect -f '{{.State.ExitCode}}' "$name")" = 0 ] || fail "exit code after SIGTERM"
log "ok: docker stop in ${ms}ms, exit code 0"
log "all checks passed (engine $(docker version -f '{{.Server.Version}}, API {{.Server.APIVersion}}'))"
