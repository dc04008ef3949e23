#!/usr/bin/env bash
# Start/stop a throwaway CNCF distribution registry on 127.0.0.1 for tests.
#
#   tests/scripts/registry.sh start DIR PORT [--auth USER:PASS | --token USER:PASS]
#   tests/scripts/registry.sh stop DIR
#
# DIR receives config.yml, data/ (blob storage), htpasswd (with --auth),
# registry.pid and registry.log. `start` returns once GET /v2/ answers
# (200, or 401 with auth); fails after 10 s. Needs docker-registry, curl and,
# for --auth, htpasswd (apache2-utils): see .ci/scripts/setup.sh.
#
# --token USER:PASS: bearer-token auth. Also starts tests/scripts/token-server.py
# (python from ${OUTPOST_VENV:-REPO/.work/venv}, needs `cryptography`) on a free
# port; DIR also gets token.key, token.crt, token.port (the realm's port),
# token.pid and token.log. Realm http://127.0.0.1:$(cat DIR/token.port)/token,
# service outpost-test-registry, issuer outpost-test-issuer. `start` returns
# once GET /v2/ answers 401 with a `WWW-Authenticate: Bearer realm=...` header.
# `stop` stops both processes.
set -euo pipefail

REGISTRY_BIN="${REGISTRY_BIN:-/usr/bin/docker-registry}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TOKEN_SERVER="$REPO/tests/scripts/token-server.py"
TOKEN_SERVICE=outpost-test-registry  # token-server.py copies `aud` from ?service=
TOKEN_ISSUER=outpost-test-issuer     # must match ISSUER in token-server.py
TIMEOUT_S=10

usage() {
    echo "usage: $0 start DIR PORT [--auth USER:PASS | --token USER:PASS] | stop DIR" >&2
    exit 2
}

die() { echo "registry.sh: $*" >&2; exit 1; }

# REGISTRY_ADDRESS: where it listens (default 127.0.0.1; test machines reach a bridge address).
ADDRESS="${REGISTRY_ADDRESS:-127.0.0.1}"

is_running() { # pidfile
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Does GET /v2/ on 127.0.0.1:PORT look ready? Without TOKEN_PORT: 200 or 401.
# With it: 401 whose WWW-Authenticate points at our token realm.
v2_ready() { # port [token_port]
    local url="http://$ADDRESS:$1/v2/" headers
    if [ -z "${2:-}" ]; then
        case "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true)" in
            200|401) return 0 ;;
            *) return 1 ;;
        esac
    fi
    headers="$(curl -s -o /dev/null -D - --max-time 1 "$url" || true)"
    grep -q '^HTTP/[0-9.]* 401' <<<"$headers" &&
        grep -qi "^www-authenticate: Bearer realm=\"http://127.0.0.1:$2/token\"" <<<"$headers"
}

cmd_start() {
    [ $# -ge 2 ] || usage
    local dir="$1" port="$2" auth="" token="" token_port=""
    shift 2
    while [ $# -gt 0 ]; do
        case "$1" in
            --auth) [ $# -ge 2 ] || usage; auth="$2"; shift 2 ;;
            --auth=*) auth="${1#--auth=}"; shift ;;
            --token) [ $# -ge 2 ] || usage; token="$2"; shift 2 ;;
            --token=*) token="${1#--token=}"; shift ;;
            *) usage ;;
        esac
    done
    case "$port" in ''|*[!0-9]*) die "bad port: $port" ;; esac
    if [ -n "$auth" ] && [[ "$auth" != *:* ]]; then die "--auth wants USER:PASS"; fi
    if [ -n "$token" ] && [[ "$token" != *:* ]]; then die "--token wants USER:PASS"; fi
    if [ -n "$auth" ] && [ -n "$token" ]; then die "--auth and --token are exclusive"; fi

    mkdir -p "$dir/data"
    dir="$(cd "$dir" && pwd)"
    local pidfile="$dir/registry.pid" log="$dir/registry.log" cfg="$dir/config.yml"
    if is_running "$pidfile"; then die "already running (pid $(cat "$pidfile")) for $dir"; fi
    if is_running "$dir/token.pid"; then die "token server already running for $dir"; fi
    rm -f "$dir/token.pid" "$dir/token.port"  # stale, from a crashed run

    if [ -n "$token" ]; then
        # Start the token server first: it creates token.crt (the registry's
        # rootcertbundle, read at startup) and then token.port, on a port it binds itself.
        local python="${OUTPOST_VENV:-$REPO/.work/venv}/bin/python"
        [ -x "$python" ] || die "python not found: $python (set OUTPOST_VENV)"
        setsid "$python" "$TOKEN_SERVER" "$dir" 0 "$token" >"$dir/token.log" 2>&1 </dev/null &
        echo $! >"$dir/token.pid"
        local deadline=$((SECONDS + TIMEOUT_S))
        until [ -s "$dir/token.port" ]; do
            if ! is_running "$dir/token.pid"; then
                rm -f "$dir/token.pid"
                die "token server exited during start; log:
$(cat "$dir/token.log")"
            fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                stop_pidfile "$dir/token.pid" >/dev/null
                die "token server not ready after ${TIMEOUT_S}s; log:
$(cat "$dir/token.log")"
            fi
            sleep 0.05
        done
        token_port="$(cat "$dir/token.port")"
    fi

    {
        echo "version: 0.1"
        echo "log:"
        echo "  level: info"
        echo "  accesslog:"
        echo "    disabled: true"
        echo "storage:"
        echo "  filesystem:"
        echo "    rootdirectory: $dir/data"
        echo "  delete:"
        echo "    enabled: true"
        echo "  cache:"
        echo "    blobdescriptor: inmemory"
        echo "http:"
        echo "  addr: $ADDRESS:$port"
        echo "  secret: outpost-test-secret"
        if [ -n "$auth" ]; then
            echo "auth:"
            echo "  htpasswd:"
            echo "    realm: outpost-test"
            echo "    path: $dir/htpasswd"
        fi
        if [ -n "$token" ]; then
            echo "auth:"
            echo "  token:"
            echo "    realm: http://127.0.0.1:$token_port/token"
            echo "    service: $TOKEN_SERVICE"
            echo "    issuer: $TOKEN_ISSUER"
            echo "    rootcertbundle: $dir/token.crt"
        fi
    } >"$cfg"
    if [ -n "$auth" ]; then
        command -v htpasswd >/dev/null || die "htpasswd not found (apt-get install apache2-utils)"
        # bcrypt is the only hash distribution accepts.
        htpasswd -Bbn "${auth%%:*}" "${auth#*:}" >"$dir/htpasswd"
    fi

    # setsid: own session, so the registry survives the caller and can be killed alone.
    setsid "$REGISTRY_BIN" serve "$cfg" >"$log" 2>&1 </dev/null &
    echo $! >"$pidfile"

    local deadline=$((SECONDS + TIMEOUT_S))
    while :; do
        if v2_ready "$port" "$token_port"; then
            # Answer must come from our process, not another server on the port.
            sleep 0.1
            is_running "$pidfile" && break
        fi
        if ! is_running "$pidfile"; then
            cmd_stop "$dir" >/dev/null || true
            die "registry exited during start; log:
$(cat "$log")"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            cmd_stop "$dir" || true
            die "registry not ready on $ADDRESS:$port after ${TIMEOUT_S}s; log:
$(cat "$log")"
        fi
        sleep 0.05
    done
    echo "registry: 127.0.0.1:$port pid $(cat "$pidfile") dir $dir${auth:+ auth ${auth%%:*}}${token:+ token ${token%%:*} realm http://127.0.0.1:$token_port/token pid $(cat "$dir/token.pid")}"
}

# TERM (then KILL after 5 s) the process in pidfile, remove the file, print its pid.
stop_pidfile() { # pidfile
    local pid i
    pid="$(cat "$1")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$1"
    echo "$pid"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir="$1" pidfile="$1/registry.pid" pid
    if [ -f "$dir/token.pid" ]; then
        pid="$(stop_pidfile "$dir/token.pid")"
        rm -f "$dir/token.port"
        echo "token server: stopped (pid $pid)"
    fi
    [ -f "$pidfile" ] || { echo "registry: not running ($dir)"; return 0; }
    pid="$(stop_pidfile "$pidfile")"
    echo "registry: stopped (pid $pid)"
}

[ $# -ge 1 ] || usage
sub="$1"; shift
case "$sub" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    *) usage ;;
esac
