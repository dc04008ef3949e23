#!/usr/bin/env bash
# Outpost quickstart: the vendor's flow and the customer's agent end to end on this machine.
#
#   deploy/quickstart.sh        vendor: keygen → trust root → build → sign → verify → inspect →
#                               push to a file drop and to a local OCI registry;
#                               customer: outpost-agent (runtime none) polls the registry, holds
#                               the release for approval, shows the plan, approves it
#   deploy/quickstart.sh stop   stop the agent and the registry, remove everything they created
#
# Everything lives under .work/quickstart/; the registry listens on 127.0.0.1 only, the agent on
# a unix socket only. (Running containers arrives with the runtime issues.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$PWD"
WORK="$REPO/.work/quickstart"
PORT="${OUTPOST_QUICKSTART_PORT:-5000}"
export OUTPOST_PASSWORD="${OUTPOST_PASSWORD:-demo}"

step() { printf '\n== %s\n' "$*"; }

stop_agent() {
    if [ -f "$WORK/agent.pid" ]; then
        kill "$(cat "$WORK/agent.pid")" 2>/dev/null || true
        rm -f "$WORK/agent.pid"
    fi
}

if [ "${1:-}" = "stop" ]; then
    stop_agent
    bash tests/scripts/registry.sh stop "$WORK/registry" 2>/dev/null || true
    rm -rf "$WORK"
    echo "quickstart stopped and cleaned up"
    exit 0
fi

step "installing the tools the demo uses (docker-registry, skopeo, ...)"
.ci/scripts/setup.sh

step "building outpost-signer and outpost-agent"
cargo build --locked -q -p outpost-signer -p outpost-agent
SIGNER="$REPO/target/debug/outpost-signer"
AGENT="$REPO/target/debug/outpost-agent"

stop_agent
bash tests/scripts/registry.sh stop "$WORK/registry" 2>/dev/null || true
rm -rf "$WORK"
mkdir -p "$WORK"

step "vendor: create a signing key (cosign format, password from OUTPOST_PASSWORD)"
"$SIGNER" keygen --out-dir "$WORK/keys"

step "vendor: create the trust root customers pin at install"
"$SIGNER" root init --key "$WORK/keys/outpost.pub" --out "$WORK/root.json"
"$SIGNER" root sign "$WORK/root.json" --key "$WORK/keys/outpost.key"

step "vendor: build release 1.0.0 (sequence 1) from testdata/stacks/valid/everything.yaml"
"$SIGNER" build testdata/stacks/valid/everything.yaml --version 1.0.0 --sequence 1 --offline --out "$WORK/shop-1.0.0.tar"

step "vendor: sign it"
"$SIGNER" sign "$WORK/shop-1.0.0.tar" --key "$WORK/keys/outpost.key"

step "anyone: verify it against the public key, then against the pinned root"
"$SIGNER" verify "$WORK/shop-1.0.0.tar" --key "$WORK/keys/outpost.pub"
"$SIGNER" verify "$WORK/shop-1.0.0.tar" --root "$WORK/root.json"

step "a tampered copy is refused (exit 1, one line naming the check)"
cp "$WORK/shop-1.0.0.tar" "$WORK/tampered.tar"
python3 - "$WORK/tampered.tar" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
at = data.find(b'"memory":"2Gi"')
data[at + 11] = ord("9")
open(sys.argv[1], "wb").write(data)
PY
if "$SIGNER" verify "$WORK/tampered.tar" --root "$WORK/root.json"; then
    echo "quickstart: the tampered bundle verified, which must never happen" >&2
    exit 1
fi

step "inspect"
"$SIGNER" inspect "$WORK/shop-1.0.0.tar"

step "publish: file drop (air-gapped sites carry this file)"
"$SIGNER" push "$WORK/shop-1.0.0.tar" "dir://$WORK/drop"

step "publish: OCI registry on 127.0.0.1:$PORT"
bash tests/scripts/registry.sh start "$WORK/registry" "$PORT"
"$SIGNER" push "$WORK/shop-1.0.0.tar" "oci://127.0.0.1:$PORT/acme/shop:1.0.0"
DIGEST=$(skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$PORT/acme/shop:1.0.0" | sha256sum | cut -d' ' -f1)
echo "skopeo reads it back from the registry: sha256:$DIGEST"
"$SIGNER" push "$WORK/shop-1.0.0.tar" "oci://127.0.0.1:$PORT/acme/shop:stable"

step "customer: configure outpost-agent (root pinned, manual approval, runtime none)"
mkdir -p "$WORK/customer"
cp "$WORK/root.json" "$WORK/customer/root.json"
cat > "$WORK/customer/agent.yaml" <<YAML
source:
  oci: {reference: "127.0.0.1:$PORT/acme/shop:stable", interval: 2s}
trust: {root: root.json}
expect: {name: shop, channel: stable}
approval: {mode: manual}
permissions: {execution: {}, storage: {}}
state_dir: state
api: {socket: agent.sock}
runtime: none
YAML
cat "$WORK/customer/agent.yaml"
CONFIG=(--config "$WORK/customer/agent.yaml")

step "customer: check the bundle offline before trusting the registry"
"$AGENT" verify "$WORK/shop-1.0.0.tar" "${CONFIG[@]}"

step "customer: start the agent (log: $WORK/customer/agent.log)"
"$AGENT" run "${CONFIG[@]}" >"$WORK/customer/agent.log" 2>&1 &
echo $! > "$WORK/agent.pid"
for _ in $(seq 100); do
    if "$AGENT" status "${CONFIG[@]}" --output json 2>/dev/null | grep -q '"waiting_for"'; then break; fi
    sleep 0.2
done
"$AGENT" status "${CONFIG[@]}"

step "customer: what would change"
"$AGENT" plan "${CONFIG[@]}"

step "customer: approve it"
"$AGENT" approve 1.0.0 "${CONFIG[@]}"
"$AGENT" status "${CONFIG[@]}"
"$AGENT" status "${CONFIG[@]}" --output json | grep -q '"sequence": 1' || {
    echo "quickstart: release 1.0.0 did not become current" >&2
    exit 1
}

cat <<DONE

Quickstart done.
  bundle:    $WORK/shop-1.0.0.tar   (also in $WORK/drop/)
  registry:  oci://127.0.0.1:$PORT/acme/shop:1.0.0  (running; signature under the sha256-<hex>.sig tag)
  keys:      $WORK/keys/   root: $WORK/root.json
  agent:     running, $AGENT status --config $WORK/customer/agent.yaml
Stop and clean up with: deploy/quickstart.sh stop
DONE
