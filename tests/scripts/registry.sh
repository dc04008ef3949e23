#!/usr/bin/env bash
# Start/stop a throwaway CNCF distribution registry on 127.0.0.1 for tests.
#
#   tests/scripts/registry.sh start DIR PORT [--auth USER:PASS]
#   tests/scripts/registry.sh stop DIR
#
# DIR receives config.yml, data/ (blob storage), htpasswd (with --auth),
# registry.pid and registry.log. `start` returns once GET /v2/ answers
# (200, or 401 with auth); fails after 10 s. Needs docker-registry, curl and,
# for --auth, htpasswd (apache2-utils): see .ci/scripts/setup.sh.
set -euo pipefail

REGISTRY_BIN="${REGISTRY_BIN:-/usr/bin/docker-registry}"
TIMEOUT_S=10

usage() {
    echo "usage: $0 start DIR PORT [--auth USER:PASS] | stop DIR" >&2
    exit 2
}

die() { echo "registry.sh: $*" >&2; exit 1; }

is_running() { # pidfile
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

cmd_start() {
    [ $# -ge 2 ] || usage
    local dir="$1" port="$2" auth=""
    shift 2
    while [ $# -gt 0 ]; do
        case "$1" in
            --auth) [ $# -ge 2 ] || usage; auth="$2"; shift 2 ;;
            --auth=*) auth="${1#--auth=}"; shift ;;
            *) usage ;;
        esac
    done
    case "$port" in ''|*[!0-9]*) die "bad port: $port" ;; esac
    if [ -n "$auth" ] && [[ "$auth" != *:* ]]; then die "--auth wants USER:PASS"; fi

    mkdir -p "$dir/data"
    dir="$(cd "$dir" && pwd)"
    local pidfile="$dir/registry.pid" log="$dir/registry.log" cfg="$dir/config.yml"
    if is_running "$pidfile"; then die "already running (pid $(cat "$pidfile")) for $dir"; fi

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
        echo "  addr: 127.0.0.1:$port"
        echo "  secret: outpost-test-secret"
        if [ -n "$auth" ]; then
            echo "auth:"
            echo "  htpasswd:"
            echo "    realm: outpost-test"
            echo "    path: $dir/htpasswd"
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

    local deadline=$((SECONDS + TIMEOUT_S)) code
    while :; do
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port/v2/" || true)"
        case "$code" in
            200|401)
                # Answer must come from our process, not another server on the port.
                sleep 0.1
                is_running "$pidfile" && break ;;
        esac
        if ! is_running "$pidfile"; then
            rm -f "$pidfile"
            die "registry exited during start; log:
$(cat "$log")"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            cmd_stop "$dir" || true
            die "registry not ready on 127.0.0.1:$port after ${TIMEOUT_S}s; log:
$(cat "$log")"
        fi
        sleep 0.05
    done
    echo "registry: 127.0.0.1:$port pid $(cat "$pidfile") dir $dir${auth:+ auth ${auth%%:*}}"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir="$1" pidfile="$1/registry.pid" pid i
    [ -f "$pidfile" ] || { echo "registry: not running ($dir)"; return 0; }
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidfile"
    echo "registry: stopped (pid $pid)"
}

[ $# -ge 1 ] || usage
sub="$1"; shift
case "$sub" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    *) usage ;;
esac
