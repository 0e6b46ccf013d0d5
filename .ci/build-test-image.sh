#!/usr/bin/env bash
# Builds dso-testsrv and dso-init as static binaries, and the image dso-testsrv:test
# (FROM scratch, dso-testsrv only: dso-init is bind-mounted from the host, never baked in).
#
#   bash .ci/build-test-image.sh             # needs a Docker engine: source .ci/services.sh; ensure_docker
#   bash .ci/build-test-image.sh --init-path # only print where the static dso-init is (is) built
#
# Env: DSO_TESTSRV_IMAGE (default dso-testsrv:test). Logs the binary paths and the image id
# on stderr; prints the static dso-init's path on stdout (what DSO_INIT_BIN must be).
# The static build has its own target dir (target/static) so it never waits on, nor
# invalidates, the normal build's cache.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${DSO_TESTSRV_IMAGE:-dso-testsrv:test}
target_dir="$root/target/static"

log() { printf '[build-test-image] %s\n' "$*" >&2; }

# musl when its target is installed (fully static by nature); else glibc with crt-static.
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
    triple=x86_64-unknown-linux-musl
else
    triple=x86_64-unknown-linux-gnu
fi
bin="$target_dir/$triple/release/dso-testsrv"
init_bin="$target_dir/$triple/release/dso-init"
if [ "${1:-}" = --init-path ]; then
    printf '%s\n' "$init_bin"
    exit 0
fi

if [ "$triple" = x86_64-unknown-linux-musl ]; then
    log "cargo build --release -p dso-testsrv -p dso-init --target $triple"
    cargo build --release -p dso-testsrv -p dso-init --target "$triple" --target-dir "$target_dir" \
        --manifest-path "$root/Cargo.toml"
else
    log "RUSTFLAGS='-C target-feature=+crt-static -C strip=debuginfo' cargo build --release -p dso-testsrv -p dso-init --target $triple"
    RUSTFLAGS='-C target-feature=+crt-static -C strip=debuginfo' \
        cargo build --release -p dso-testsrv -p dso-init --target "$triple" --target-dir "$target_dir" \
        --manifest-path "$root/Cargo.toml"
fi

# A scratch image has no loader, and dso-init runs inside any image (whatever its libc):
# refuse anything dynamically linked.
for b in "$bin" "$init_bin"; do
    if command -v file >/dev/null && file "$b" | grep -q 'dynamically linked'; then
        log "ERROR: $b is dynamically linked; it would not start in a FROM scratch image"
        exit 1
    fi
    log "static binary: $b ($(du -h "$b" | cut -f1))"
done

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$root/rotator/testsrv/Dockerfile" "$ctx/Dockerfile"
cp "$bin" "$ctx/dso-testsrv"
log "docker build -t $image (legacy builder, offline)"
# The 28.x client warns that the legacy builder is deprecated: show its output only on failure.
if ! out=$(DOCKER_BUILDKIT=0 docker build -q -t "$image" "$ctx" 2>&1); then
    printf '%s\n' "$out" >&2
    log "ERROR: docker build failed"
    exit 1
fi
log "image $image: $(docker image inspect -f '{{.Id}}' "$image")"
printf '%s\n' "$init_bin"
