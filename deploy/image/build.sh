#!/usr/bin/env bash
# Builds the outpost-agent container image: a static glibc binary in an empty (scratch) image.
#
#   deploy/image/build.sh [IMAGE]      IMAGE defaults to outpost-agent:<workspace version>
#
# Needs a Rust toolchain and docker or podman (OUTPOST_ENGINE=podman picks podman when both are
# installed). The image carries the build machine's glibc; with Debian 12's (2.36) a static
# binary resolves names from /etc/hosts and DNS without NSS modules, which an empty image lacks.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

fail() { echo "build.sh: $*" >&2; exit 1; }

ENGINE="${OUTPOST_ENGINE:-}"
if [ -z "$ENGINE" ]; then
    if command -v docker >/dev/null 2>&1; then ENGINE=docker
    elif command -v podman >/dev/null 2>&1; then ENGINE=podman
    else fail "neither docker nor podman is installed"
    fi
fi
command -v "$ENGINE" >/dev/null 2>&1 || fail "$ENGINE is not installed"
CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$CA" ] || fail "$CA missing: apt-get install ca-certificates"

VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
[ -n "$VERSION" ] || fail "no version in Cargo.toml"
IMAGE="${1:-outpost-agent:$VERSION}"
REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"

# With an explicit --target, RUSTFLAGS reach the agent's crates only: build scripts and proc
# macros, which the compiler loads as shared objects, stay dynamic. git2's OpenSSL and zlib are
# linked from archives (OpenSSL's from libssl-dev, zlib built from libz-sys's bundled source).
TARGET=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" OPENSSL_STATIC=1 LIBZ_SYS_STATIC=1 \
    cargo build --release --locked -p outpost-agent --features kubernetes --target "$TARGET"
BINARY="target/$TARGET/release/outpost-agent"
# A program interpreter (ld.so) means dynamic linking, which an empty image cannot serve.
command -v readelf >/dev/null 2>&1 || fail "readelf is missing (apt-get install binutils)"
headers="$(readelf -l "$BINARY")" || fail "readelf could not read $BINARY"
if [[ "$headers" == *"program interpreter"* ]]; then
    fail "$BINARY is dynamically linked; it would not start in an empty image"
fi

CONTEXT="$(mktemp -d)"
trap 'rm -rf "$CONTEXT"' EXIT
cp "$BINARY" "$CA" deploy/image/Containerfile "$CONTEXT/"
"$ENGINE" build -f "$CONTEXT/Containerfile" \
    --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
    -t "$IMAGE" "$CONTEXT"
echo "built $IMAGE ($ENGINE)"
