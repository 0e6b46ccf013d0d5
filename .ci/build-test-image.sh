#!/usr/bin/env bash
# Builds dso-testsrv as one static binary and the image dso-testsrv:test (FROM scratch).
#
#   bash .ci/build-test-image.sh          # needs a Docker engine: source .ci/services.sh; ensure_docker
#
# Env: DSO_TESTSRV_IMAGE (default dso-testsrv:test). Prints the binary path and the image id.
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
    log "cargo build --release -p dso-testsrv --target $triple"
    cargo build --release -p dso-testsrv --target "$triple" --target-dir "$target_dir" \
        --manifest-path "$root/Cargo.toml"
else
    triple=x86_64-unknown-linux-gnu
    log "RUSTFLAGS='-C target-feature=+crt-static -C strip=debuginfo' cargo build --release -p dso-testsrv --target $triple"
    RUSTFLAGS='-C target-feature=+crt-static -C strip=debuginfo' \
        cargo build --release -p dso-testsrv --target "$triple" --target-dir "$target_dir" \
        --manifest-path "$root/Cargo.toml"
fi
bin="$target_dir/$triple/release/dso-testsrv"

# A scratch image has no loader: refuse anything dynamically linked.
if command -v file >/dev/null && file "$bin" | grep -q 'dynamically linked'; then
    log "ERROR: $bin is dynamically linked; it would not start in a FROM scratch image"
    exit 1
fi
log "static binary: $bin ($(du -h "$bin" | cut -f1))"

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
