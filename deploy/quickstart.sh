#!/usr/bin/env bash
# Outpost quickstart: the vendor's flow and the customer's agent running a demo end to end.
#
#   deploy/quickstart.sh        vendor: demo image → key → build → sign → verify (a tampered
#                               copy is refused); customer: a container engine (started if none
#                               runs), outpost-agent on a file drop with the vendor key pinned,
#                               manual approval; release 1.0.0 is approved, rolled out and
#                               answers on its public endpoint; release 1.1.0 rolls over it.
#                               The demo keeps running afterwards.
#   deploy/quickstart.sh stop   stop the agent, the demo's containers, the registry and any
#                               engine this script started; remove everything it created
#
# Everything lives under .work/quickstart/. The registry, the engine's published ports and the
# demo's endpoint are on 127.0.0.1 only; the agent's API is a unix socket.
#   OUTPOST_QUICKSTART_PORT  registry port (default 5000)
#   OUTPOST_DEMO_PORT        the demo's public endpoint (default 8080)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
WORK="$REPO/.work/quickstart"
PORT="${OUTPOST_QUICKSTART_PORT:-5000}"
DEMO_PORT="${OUTPOST_DEMO_PORT:-8080}"
REGISTRY="127.0.0.1:$PORT"
export OUTPOST_PASSWORD="${OUTPOST_PASSWORD:-demo}"
# The binaries are where cargo puts them: CARGO_TARGET_DIR when set (relative to the repository,
# as cargo takes it from here), else target/.
TARGET="${CARGO_TARGET_DIR:-target}"
case "$TARGET" in /*) ;; *) TARGET="$REPO/$TARGET" ;; esac
SIGNER="$TARGET/debug/outpost-signer"
AGENT="$TARGET/debug/outpost-agent"
CONFIG=(--config "$WORK/customer/agent.yaml")

step() { printf '\n== %s\n' "$*"; }
fail() { echo "quickstart: $*" >&2; exit 1; }

engine_api() { # METHOD PATH
    curl -sf -X "$1" --unix-socket "$(cat "$WORK/engine.socket")" "http://engine/v1.41$2"
}

# Stops what a previous run started: the agent (waiting until it is gone, so it repairs
# nothing behind us), the demo's containers, volume, network and images (on an engine we did
# not start), our engine, the registry.
stop_all() {
    if [ -f "$WORK/agent.pid" ]; then
        local pid
        pid="$(cat "$WORK/agent.pid")"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$WORK/agent.pid"
    fi
    if [ -f "$WORK/engine.socket" ] && [ ! -d "$WORK/engine" ]; then
        for name in $(engine_api GET '/containers/json?all=true&filters=%7B%22label%22%3A%5B%22dev.outpost.stack%3Ddemo%22%5D%7D' |
            python3 -c 'import json,sys; print("\n".join(c["Names"][0].lstrip("/") for c in json.load(sys.stdin)))' 2>/dev/null); do
            engine_api DELETE "/containers/$name?force=true" >/dev/null || true
        done
        engine_api DELETE /volumes/demo-store-0-data >/dev/null 2>&1 || true
        engine_api DELETE /networks/outpost-demo >/dev/null 2>&1 || true
        for variant in 1 2; do
            engine_api DELETE "/images/$REGISTRY/outpost-demo/web:$variant?force=true" >/dev/null 2>&1 || true
        done
    fi
    if [ -d "$WORK/engine" ]; then
        bash tests/scripts/engine.sh stop "$WORK/engine" >/dev/null 2>&1 || true
    fi
    bash tests/scripts/registry.sh stop "$WORK/registry" >/dev/null 2>&1 || true
}

if [ "${1:-}" = "stop" ]; then
    stop_all
    rm -rf "$WORK"
    echo "quickstart stopped and cleaned up"
    exit 0
fi

# Waits until `status --output json` satisfies a Python expression on `s` (the status).
wait_status() { # SECONDS DESCRIPTION EXPRESSION
    local deadline=$((SECONDS + $1))
    until "$AGENT" status "${CONFIG[@]}" --output json 2>/dev/null |
        python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if ($3) else 1)" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            "$AGENT" status "${CONFIG[@]}" || true
            tail -20 "$WORK/customer/agent.log" >&2 || true
            fail "timed out waiting for $2"
        fi
        sleep 0.5
    done
}

converged() { # VERSION
    echo "s['current'] and s['current']['version'] == '$1' and s['runtime'].get('converged') == s['current']['digest'] and s['runtime'].get('phase') == 'converged'"
}

step "installing what the demo uses (docker.io, podman, docker-registry, skopeo, busybox-static, ...)"
.ci/scripts/setup.sh

step "building outpost-signer and outpost-agent (a few minutes the first time; cargo shows its progress)"
cargo build --locked -p outpost-signer -p outpost-agent

stop_all
rm -rf "$WORK"
mkdir -p "$WORK/customer" "$WORK/drop"

step "a registry on $REGISTRY with the demo images (busybox-based; nothing is pulled from outside)"
bash tests/scripts/registry.sh start "$WORK/registry" "$PORT"
for variant in 1 2; do
    python3 tests/scripts/demo-image.py "$WORK/image-$variant" --variant "$variant" >/dev/null
    skopeo copy -q --dest-tls-verify=false "oci:$WORK/image-$variant" "docker://$REGISTRY/outpost-demo/web:$variant"
    echo "pushed $REGISTRY/outpost-demo/web:$variant"
done

step "a container engine"
if curl -sf --max-time 2 --unix-socket /var/run/docker.sock http://engine/_ping >/dev/null 2>&1; then
    echo /var/run/docker.sock >"$WORK/engine.socket"
    echo "using the running engine at /var/run/docker.sock"
else
    bash tests/scripts/engine.sh start docker "$WORK/engine" | tail -1 >"$WORK/engine.socket"
    echo "started dockerd for the demo: $(cat "$WORK/engine.socket")"
fi

step "vendor: create a signing key (cosign format, password from OUTPOST_PASSWORD)"
"$SIGNER" keygen --out-dir "$WORK/keys"

release() { # VERSION SEQUENCE IMAGE_TAG GREETING
    sed -e "s|127.0.0.1:5000/outpost-demo/web:1|$REGISTRY/outpost-demo/web:$3|" \
        -e "s|hello from the Outpost demo|$4|" testdata/stacks/demo/demo.yaml >"$WORK/demo-$1.yaml"
    "$SIGNER" build "$WORK/demo-$1.yaml" --version "$1" --sequence "$2" --out "$WORK/demo-$1.tar"
    "$SIGNER" sign "$WORK/demo-$1.tar" --key "$WORK/keys/outpost.key"
    "$SIGNER" verify "$WORK/demo-$1.tar" --key "$WORK/keys/outpost.pub"
}

step "vendor: build, sign and verify demo 1.0.0 from testdata/stacks/demo/demo.yaml (tags pinned to digests)"
release 1.0.0 1 1 "hello from the Outpost demo 1.0.0"

step "a tampered copy is refused (exit 1, one line naming the check)"
cp "$WORK/demo-1.0.0.tar" "$WORK/tampered.tar"
python3 - "$WORK/tampered.tar" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
at = data.find(b'"memory":"32Mi"')
assert at >= 0, "the stack's memory field is not where the tamper step expects it"
data[at + 10] = ord("9")
open(sys.argv[1], "wb").write(data)
PY
if "$SIGNER" verify "$WORK/tampered.tar" --key "$WORK/keys/outpost.pub"; then
    fail "the tampered bundle verified, which must never happen"
fi

step "customer: configure outpost-agent (vendor key pinned, file drop, manual approval, docker runtime)"
cp "$WORK/keys/outpost.pub" "$WORK/customer/vendor.pub"
cat >"$WORK/customer/agent.yaml" <<YAML
source:
  dir: {path: $WORK/drop}
trust: {keys: [vendor.pub]}
expect: {name: demo, channel: stable}
approval: {mode: manual}
permissions:
  web: {environment: {DEMO_CREDENTIAL: granted-by-the-customer}}
  store: {}
state_dir: state
api: {socket: agent.sock}
runtime: docker
docker:
  socket: $(cat "$WORK/engine.socket")
  network: {subnet: 10.213.250.0/24}
  publish: {address: 127.0.0.1, ports: {web: $DEMO_PORT}}
  stop_timeout_seconds: 5
rollout: {grace_seconds: 2, drift_interval_seconds: 10, progress_deadline_seconds: 120}
YAML
cat "$WORK/customer/agent.yaml"

step "customer: start the agent (log: $WORK/customer/agent.log)"
"$AGENT" run "${CONFIG[@]}" >"$WORK/customer/agent.log" 2>&1 &
echo $! >"$WORK/agent.pid"
wait_status 30 "the agent" "True"

step "vendor → customer: drop demo 1.0.0 into the file drop (as from a USB stick)"
"$SIGNER" push "$WORK/demo-1.0.0.tar" "dir://$WORK/drop"
wait_status 30 "1.0.0 pending" "s['pending'] and s['pending']['version'] == '1.0.0'"
"$AGENT" status "${CONFIG[@]}"

step "customer: review the plan, approve what was reviewed"
"$AGENT" plan "${CONFIG[@]}"
DIGEST=$("$AGENT" status "${CONFIG[@]}" --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pending"]["digest"])')
"$AGENT" approve 1.0.0 --digest "$DIGEST" "${CONFIG[@]}"

step "the agent rolls 1.0.0 out: pull, store first (links order), then web, each health-checked"
wait_status 180 "1.0.0 converged and healthy" "$(converged 1.0.0)"
"$AGENT" status "${CONFIG[@]}"

step "the demo answers on its public endpoint http://127.0.0.1:$DEMO_PORT/"
ANSWER=$(curl -sf --max-time 5 "http://127.0.0.1:$DEMO_PORT/cgi-bin/index") || fail "no answer on 127.0.0.1:$DEMO_PORT"
echo "$ANSWER"
grep -q "demo 1.0.0 (image 1" <<<"$ANSWER" || fail "unexpected answer from 1.0.0"

step "vendor: release 1.1.0 (new image, new greeting); customer approves; rolling update"
release 1.1.0 2 2 "hello from the Outpost demo 1.1.0"
"$SIGNER" push "$WORK/demo-1.1.0.tar" "dir://$WORK/drop"
wait_status 30 "1.1.0 pending" "s['pending'] and s['pending']['version'] == '1.1.0'"
"$AGENT" plan "${CONFIG[@]}"
"$AGENT" approve 1.1.0 "${CONFIG[@]}"
# Show the rollout as it goes: each resource's step; the endpoint keeps answering.
deadline=$((SECONDS + 180))
until "$AGENT" status "${CONFIG[@]}" --output json | python3 -c "import json,sys; s=json.load(sys.stdin); sys.exit(0 if ($(converged 1.1.0)) else 1)"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "1.1.0 did not converge"
    "$AGENT" status "${CONFIG[@]}" | grep -E '^(runtime|resource):' | sed 's/^/  /'
    printf '  endpoint: %s\n' "$(curl -s --max-time 2 "http://127.0.0.1:$DEMO_PORT/cgi-bin/index" | head -1)"
    sleep 1
done
"$AGENT" status "${CONFIG[@]}"
ANSWER=$(curl -sf --max-time 5 "http://127.0.0.1:$DEMO_PORT/cgi-bin/index") || fail "no answer after the update"
echo "$ANSWER"
grep -q "demo 1.1.0 (image 2" <<<"$ANSWER" || fail "unexpected answer from 1.1.0"

step "history"
"$AGENT" history "${CONFIG[@]}" --limit 12

cat <<DONE

Quickstart done. The demo keeps running:
  open:      http://127.0.0.1:$DEMO_PORT/   (curl http://127.0.0.1:$DEMO_PORT/cgi-bin/index)
  status:    $AGENT status --config $WORK/customer/agent.yaml
  roll back: $AGENT rollback --config $WORK/customer/agent.yaml
  files:     $WORK  (bundles, keys, agent.yaml, agent.log)
Stop and clean up with: deploy/quickstart.sh stop
DONE
