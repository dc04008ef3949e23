#!/usr/bin/env bash
# Start/stop a throwaway container engine serving the Docker Engine API on a unix socket.
#
#   tests/scripts/engine.sh start docker|podman DIR   # prints the socket path on its last line
#   tests/scripts/engine.sh stop DIR
#   tests/scripts/engine.sh halt DIR                  # the engine process only (as a crash or a
#                                                     # service restart does); `start` it again
#
# DIR receives the engine's storage, run state, config, engine.pid, engine.log and
# engine.sock. dockerd runs with --bridge=none --iptables=false (networks are created by the
# agent with explicit subnets); podman uses runc and cgroupfs with file events, as this
# machine needs (../shared/notes/test-environment.md). 127.0.0.1 registries are insecure.
set -euo pipefail

TIMEOUT_S=30

usage() {
    echo "usage: $0 start docker|podman DIR | stop DIR | halt DIR" >&2
    exit 2
}

die() { echo "engine.sh: $*" >&2; exit 1; }

is_running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# SIGTERM, then SIGKILL if the process is still there after 10 s.
terminate() {
    local i
    kill -TERM "$1" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$1" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$1" 2>/dev/null || true
}

cmd_start() {
    [ $# -eq 2 ] || usage
    local kind="$1" dir="$2"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    local pidfile="$dir/engine.pid" log="$dir/engine.log" sock="$dir/engine.sock"
    if is_running "$pidfile"; then die "already running (pid $(cat "$pidfile")) for $dir"; fi
    rm -f "$sock"
    case "$kind" in
        docker)
            command -v dockerd >/dev/null || die "dockerd not found (apt-get install docker.io)"
            # ENGINE_NETNS: run inside that network namespace (a test machine's).
            local in_netns=()
            # nsenter, not `ip netns exec`: that remounts /sys and hides the cgroup mounts.
            [ -z "${ENGINE_NETNS:-}" ] || in_netns=(nsenter --net="/var/run/netns/$ENGINE_NETNS")
            setsid "${in_netns[@]}" dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
                -H "unix://$sock" --bridge=none --iptables=false --ip-masq=false \
                --insecure-registry 127.0.0.0/8 --insecure-registry 10.201.0.0/16 >"$log" 2>&1 </dev/null &
            ;;
        podman)
            command -v podman >/dev/null || die "podman not found (apt-get install podman)"
            mkdir -p "$dir/storage" "$dir/run" "$dir/tmp" "$dir/networks"
            cat >"$dir/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[network]
network_backend = "netavark"
network_config_dir = "$dir/networks"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$dir/events.log"
tmp_dir = "$dir/tmp"
EOF
            cat >"$dir/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$dir/storage"
runroot = "$dir/run"
EOF
            cat >"$dir/registries.conf" <<EOF
[[registry]]
location = "127.0.0.1"
insecure = true
[[registry]]
prefix = "127.0.0.1:*"
location = "127.0.0.1"
insecure = true
EOF
            # Podman keeps network run state (netavark's IPAM, aardvark-dns) in the host-wide
            # /run/containers/networks: give this engine its own, in a mount namespace.
            mkdir -p "$dir/netrun"
            # Started again after `halt`: back into the mount namespace its containers' network
            # namespaces are mounted in (a process of theirs keeps it alive).
            local holder=""
            [ ! -f "$dir/mntns-holder" ] || holder="$(cat "$dir/mntns-holder")"
            rm -f "$dir/mntns-holder"
            if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null; then
                CONTAINERS_CONF="$dir/containers.conf" CONTAINERS_STORAGE_CONF="$dir/storage.conf" \
                    CONTAINERS_REGISTRIES_CONF="$dir/registries.conf" \
                    setsid nsenter --mount="/proc/$holder/ns/mnt" \
                    podman --root "$dir/storage" --runroot "$dir/run" system service --time=0 \
                    "unix://$sock" >"$log" 2>&1 </dev/null &
            else
            CONTAINERS_CONF="$dir/containers.conf" CONTAINERS_STORAGE_CONF="$dir/storage.conf" \
                CONTAINERS_REGISTRIES_CONF="$dir/registries.conf" \
                setsid unshare --mount --propagation private sh -c '
                    mkdir -p /run/containers/networks &&
                    mount --bind "$1/netrun" /run/containers/networks &&
                    exec podman --root "$1/storage" --runroot "$1/run" system service --time=0 "unix://$2"
                ' sh "$dir" "$sock" >"$log" 2>&1 </dev/null &
            fi
            ;;
        *) usage ;;
    esac
    echo $! >"$pidfile"
    echo "$kind" >"$dir/engine.kind"
    local deadline=$((SECONDS + TIMEOUT_S))
    until curl -sf --max-time 1 --unix-socket "$sock" http://engine/_ping >/dev/null 2>&1; do
        local failure=""
        is_running "$pidfile" || failure="$kind exited during start"
        [ "$SECONDS" -lt "$deadline" ] || failure="$kind not ready after ${TIMEOUT_S}s"
        if [ -n "$failure" ]; then
            # Nothing of a half-started engine (process, mounts) outlives the failure.
            cmd_stop "$dir" >/dev/null 2>&1 || true
            die "$failure ($dir; log $log):
$(tail -20 "$log")"
        fi
        sleep 0.1
    done
    echo "$sock"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    local dir="$1" pidfile="$1/engine.pid" pid
    [ -d "$dir" ] || return 0
    dir="$(cd "$dir" && pwd)"
    if is_running "$pidfile"; then
        local sock="$dir/engine.sock" subnets=""
        # Containers first, so nothing of ours outlives the engine.
        for id in $(curl -sf --unix-socket "$sock" 'http://engine/containers/json?all=1' |
            python3 -c 'import json,sys; print("\n".join(c["Id"] for c in json.load(sys.stdin)))' 2>/dev/null); do
            curl -sf -X DELETE --unix-socket "$sock" "http://engine/containers/$id?force=1&v=1" >/dev/null || true
        done
        # The networks' subnets, to remove bridges an engine leaves behind (netavark does when
        # it is stopped with networks in place); a stale bridge would shadow the next user of
        # the subnet.
        local net subnet
        while read -r net subnet; do
            [ -n "$net" ] || continue
            curl -sf -X DELETE --unix-socket "$sock" "http://engine/networks/$net" >/dev/null || true
            subnets="$subnets $subnet"
        done < <(curl -sf --unix-socket "$sock" 'http://engine/networks' |
            python3 -c 'import json,sys
for n in json.load(sys.stdin):
    if n["Name"].startswith("outpost-"):
        subnets = [c.get("Subnet") for c in ((n.get("IPAM") or {}).get("Config") or []) if c.get("Subnet")]
        print(n["Name"], " ".join(subnets))' 2>/dev/null || true)
        pid="$(cat "$pidfile")"
        # Podman runs in a mount namespace of its own; its helpers (aardvark-dns) go with it.
        # They are listed while the service still holds the namespace, whose number could
        # otherwise be reused by another engine starting meanwhile.
        local ns="" helpers=() proc
        if [ "$(cat "$dir/engine.kind" 2>/dev/null)" = podman ]; then
            ns="$(readlink "/proc/$pid/ns/mnt" 2>/dev/null || true)"
            [ "$ns" != "$(readlink /proc/self/ns/mnt)" ] || ns=""
        fi
        if [ -n "$ns" ]; then
            for proc in /proc/[0-9]*; do
                if [ "${proc#/proc/}" != "$pid" ] && [ "$(readlink "$proc/ns/mnt" 2>/dev/null)" = "$ns" ]; then
                    helpers+=("${proc#/proc/}")
                fi
            done
        fi
        terminate "$pid"
        for proc in "${helpers[@]}"; do kill -KILL "$proc" 2>/dev/null || true; done
        for subnet in $subnets; do
            for link in $(ip -o -4 addr show to "$subnet" 2>/dev/null | awk '{print $2}'); do
                ip link delete "$link" 2>/dev/null || true
            done
        done
    fi
    rm -f "$pidfile"
    # dockerd leaves mounts (nsfs, overlay) behind under its roots.
    { grep -o " $dir[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    echo "engine: stopped ($dir)"
}

# SIGTERM to the engine (SIGKILL after 10 s), leaving its containers, networks and data for
# the next start: dockerd stops its containers, Podman's leave them running under conmon.
cmd_halt() {
    [ $# -eq 1 ] || usage
    local pidfile="$1/engine.pid" pid
    is_running "$pidfile" || return 0
    pid="$(cat "$pidfile")"
    # Podman's containers outlive the service in its mount namespace: remember one of their
    # processes, so the next start joins that namespace (see cmd_start).
    if [ "$(cat "$1/engine.kind" 2>/dev/null)" = podman ]; then
        local ns proc
        ns="$(readlink "/proc/$pid/ns/mnt" 2>/dev/null || true)"
        for proc in /proc/[0-9]*; do
            if [ "${proc#/proc/}" != "$pid" ] && [ "$(readlink "$proc/ns/mnt" 2>/dev/null)" = "$ns" ]; then
                echo "${proc#/proc/}" >"$1/mntns-holder"
                break
            fi
        done
    fi
    terminate "$pid"
    rm -f "$pidfile"
    echo "engine: halted ($1)"
}

[ $# -ge 1 ] || usage
sub="$1"; shift
case "$sub" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    halt) cmd_halt "$@" ;;
    *) usage ;;
esac
