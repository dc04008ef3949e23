#!/usr/bin/env bash
# Builds the Debian packages outpost-agent and outpost-signer with dpkg-deb, reproducibly: the
# same binaries and SOURCE_DATE_EPOCH give the same .deb bytes.
#
#   deploy/debian/build.sh --agent PATH --signer PATH [--out DIR] [--version V]
#
# Binaries are stripped of debug information. DEB_COMPRESSION (xz, gzip, none; default xz) picks
# dpkg-deb's compressor.
#
# outpost-agent: /usr/bin/outpost-agent, its systemd unit, /etc/outpost (with an example config;
# the postinst starts the service only once /etc/outpost/agent.yaml exists), completions and
# the man page. Removing it keeps /var/lib/outpost (the state: rollback floor, history) and
# the configuration; purging removes the configuration, never the state.
# outpost-signer: /usr/bin/outpost-signer, completions and the man page.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
agent="" signer="" out="$PWD" version=""

usage() { echo "usage: $0 --agent PATH --signer PATH [--out DIR] [--version V]" >&2; exit 2; }
die() { echo "debian/build.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --agent|--signer|--out|--version)
            [ $# -ge 2 ] || { echo "debian/build.sh: $1 needs a value" >&2; usage; }
            case "$1" in
                --agent) agent="$2" ;;
                --signer) signer="$2" ;;
                --out) out="$2" ;;
                --version) version="$2" ;;
            esac
            shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$agent" ] && [ -n "$signer" ] || usage
[ -x "$agent" ] || die "$agent is not an executable"
[ -x "$signer" ] || die "$signer is not an executable"
command -v dpkg-deb >/dev/null || die "dpkg-deb is needed (Debian package dpkg)"
if [ -z "$version" ]; then
    version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -n 1)"
fi
[ -n "$version" ] || die "no version (pass --version)"
arch="$(dpkg --print-architecture)"
# Reproducible: every file's time is this (default: the last commit's, else 0).
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || echo 0)"
fi
export SOURCE_DATE_EPOCH
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Completions and the man page, from the binary's own command definitions.
shell_files() { # BINARY NAME ROOT
    local binary="$1" name="$2" root="$3"
    install -d "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions" \
        "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/man/man1" "$root/usr/share/doc/$name"
    "$binary" completions bash >"$root/usr/share/bash-completion/completions/$name"
    "$binary" completions zsh >"$root/usr/share/zsh/vendor-completions/_$name"
    "$binary" completions fish >"$root/usr/share/fish/vendor_completions.d/$name.fish"
    "$binary" man | gzip -n -9 >"$root/usr/share/man/man1/$name.1.gz"
    printf 'Files: *\nCopyright: the Outpost authors\nLicense: Apache-2.0\n' >"$root/usr/share/doc/$name/copyright"
}

# The stripped binary, its completions, man page and copyright, and the control fields every
# package has; the caller appends its own (Section, Description, ...).
stage() { # BINARY NAME ROOT
    local binary="$1" name="$2" root="$3"
    install -D -m 0755 "$binary" "$root/usr/bin/$name"
    strip --strip-debug "$root/usr/bin/$name"
    install -d "$root/DEBIAN"
    shell_files "$binary" "$name" "$root"
    cat >"$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: $arch
Maintainer: Outpost <outpost@example.com>
Installed-Size: 0
Depends: libc6, libssl3, zlib1g, libgcc-s1
Priority: optional
Homepage: https://github.com/outpost/outpost
EOF
}

# Modes and times fixed, so the archive's bytes depend only on the content.
finish() { # ROOT NAME DEB
    local root="$1" deb="$3"
    find "$root" -type d -exec chmod 0755 {} +
    find "$root" -type f -exec chmod 0644 {} +
    chmod 0755 "$root/usr/bin/"* "$root/DEBIAN/"*inst "$root/DEBIAN/"*rm 2>/dev/null || true
    local size
    # Apparent sizes: the blocks a just-written file holds vary from one build to the next.
    size="$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)"
    sed -i "s/^Installed-Size: .*/Installed-Size: $size/" "$root/DEBIAN/control"
    find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    dpkg-deb --root-owner-group "-Z${DEB_COMPRESSION:-xz}" --build "$root" "$deb" >/dev/null
    echo "built $deb"
}

# --- outpost-agent
root="$work/agent"
stage "$agent" outpost-agent "$root"
install -d "$root/lib/systemd/system" "$root/etc/outpost"
sed 's|/usr/local/bin/outpost-agent|/usr/bin/outpost-agent|; s|Install with deploy/systemd/install.sh, which places|Installed by the outpost-agent package; place|; s|the binary, /etc/outpost/agent.yaml and the pinned root.json, then enables this unit.|/etc/outpost/agent.yaml and the pinned root.json, then `systemctl enable --now outpost-agent`.|' \
    "$REPO/deploy/systemd/outpost-agent.service" >"$root/lib/systemd/system/outpost-agent.service"
install -m 0644 "$REPO/deploy/agent.example.yaml" "$root/etc/outpost/agent.example.yaml"
cat >>"$root/DEBIAN/control" <<EOF
Recommends: systemd
Section: admin
Description: pull-based deployment agent for vendor software in customer clouds
 Pulls signed release bundles from a registry, git or a file drop, verifies them against the
 keys pinned at install, holds them for approval and runs them on a container engine or a
 Kubernetes namespace, with health-checked rollout and automatic rollback.
EOF
echo "/etc/outpost/agent.example.yaml" >"$root/DEBIAN/conffiles"
cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    install -d -m 0750 /var/lib/outpost
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # Never start an unconfigured agent: it would only fail and restart.
        if [ -f /etc/outpost/agent.yaml ]; then
            systemctl enable outpost-agent.service || true
            systemctl restart outpost-agent.service || true
        fi
    fi
    if [ ! -f /etc/outpost/agent.yaml ]; then
        echo "outpost-agent: write /etc/outpost/agent.yaml (see /etc/outpost/agent.example.yaml) and the pinned root.json, then: systemctl enable --now outpost-agent" >&2
    fi
fi
exit 0
EOF
cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop outpost-agent.service || true
    systemctl disable outpost-agent.service || true
fi
exit 0
EOF
cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
# The state (/var/lib/outpost: rollback floor, history, trust rotations) is never removed.
if [ "$1" = purge ]; then
    rm -f /etc/outpost/agent.yaml /etc/outpost/root.json
    rmdir /etc/outpost 2>/dev/null || true
fi
exit 0
EOF
finish "$root" outpost-agent "$out/outpost-agent_${version}_${arch}.deb"

# --- outpost-signer
root="$work/signer"
stage "$signer" outpost-signer "$root"
cat >>"$root/DEBIAN/control" <<EOF
Section: devel
Description: build, sign and publish Outpost release bundles
 The vendor's tool: builds a release bundle from a stack file, signs it with cosign-format
 keys, manages the trust root and publishes to an OCI registry, a git repository or a file.
EOF
finish "$root" outpost-signer "$out/outpost-signer_${version}_${arch}.deb"
