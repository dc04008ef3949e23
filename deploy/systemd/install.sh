#!/usr/bin/env bash
# Installs outpost-agent as a systemd service on a VM or an on-prem host.
#
#   deploy/systemd/install.sh --binary PATH --config agent.yaml --root root.json [--no-start]
#
# Places the binary at /usr/local/bin/outpost-agent, the config at /etc/outpost/agent.yaml and
# the pinned trust root at /etc/outpost/root.json (the config's trust.root should name it) and
# the unit at /etc/systemd/system/outpost-agent.service, shell completions (bash, zsh, fish) and
# the man page under /usr/local/share, then enables and starts the service unless --no-start.
# DESTDIR=DIR installs under DIR instead of / (packaging, tests).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DESTDIR="${DESTDIR:-}"
binary="" config="" root="" start=1

usage() { echo "usage: $0 --binary PATH --config agent.yaml --root root.json [--no-start]" >&2; exit 2; }
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --binary|--config|--root)
            [ $# -ge 2 ] || { echo "install.sh: $1 needs a value" >&2; usage; }
            case "$1" in
                --binary) binary="$2" ;;
                --config) config="$2" ;;
                --root) root="$2" ;;
            esac
            shift 2 ;;
        --no-start) start=0; shift ;;
        *) usage ;;
    esac
done
[ -n "$binary" ] && [ -n "$config" ] && [ -n "$root" ] || usage
[ -x "$binary" ] || die "$binary is not an executable"
[ -f "$config" ] || die "$config: no such file"
[ -f "$root" ] || die "$root: no such file"

install -D -m 0755 "$binary" "$DESTDIR/usr/local/bin/outpost-agent"
install -d -m 0750 "$DESTDIR/etc/outpost"
install -m 0640 "$config" "$DESTDIR/etc/outpost/agent.yaml"
install -m 0644 "$root" "$DESTDIR/etc/outpost/root.json"
install -D -m 0644 "$HERE/outpost-agent.service" "$DESTDIR/etc/systemd/system/outpost-agent.service"
# Completions and the man page, generated from the binary's own command definitions.
share="$DESTDIR/usr/local/share"
install -d "$share/bash-completion/completions" "$share/zsh/site-functions" \
    "$share/fish/vendor_completions.d" "$share/man/man1"
"$binary" completions bash >"$share/bash-completion/completions/outpost-agent"
"$binary" completions zsh >"$share/zsh/site-functions/_outpost-agent"
"$binary" completions fish >"$share/fish/vendor_completions.d/outpost-agent.fish"
"$binary" man | gzip -n -9 >"$share/man/man1/outpost-agent.1.gz"
chmod 0644 "$share/bash-completion/completions/outpost-agent" "$share/zsh/site-functions/_outpost-agent" \
    "$share/fish/vendor_completions.d/outpost-agent.fish" "$share/man/man1/outpost-agent.1.gz"
echo "installed: /usr/local/bin/outpost-agent, /etc/outpost/{agent.yaml,root.json}, outpost-agent.service, completions and man page${DESTDIR:+ (under $DESTDIR)}"

if [ "$start" -eq 1 ] && [ -z "$DESTDIR" ]; then
    systemctl daemon-reload
    systemctl enable --now outpost-agent.service
    systemctl --no-pager status outpost-agent.service || true
fi
