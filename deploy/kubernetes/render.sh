#!/usr/bin/env bash
# Regenerates outpost-agent.yaml beside this script from the Helm chart (deploy/helm/outpost-agent)
# and values.yaml, with Helm's own engine (tests/scripts/chart.py; the venv of
# .ci/scripts/setup.sh). The result is meant for `kubectl apply`, so it is never edited by hand.
#
#   deploy/kubernetes/render.sh [OUT]      OUT defaults to deploy/kubernetes/outpost-agent.yaml
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${OUTPOST_VENV:-$REPO/.work/venv}/bin/python"
OUT="${1:-$HERE/outpost-agent.yaml}"

if [ ! -x "$PYTHON" ]; then
    echo "render.sh: $PYTHON missing: run .ci/scripts/setup.sh" >&2
    exit 1
fi
manifests="$("$PYTHON" "$REPO/tests/scripts/chart.py" render "$REPO/deploy/helm/outpost-agent" \
    "$HERE/values.yaml" --name outpost-agent --namespace outpost)"

# Written whole, then renamed: a failed render never leaves a half file behind.
cat > "$OUT.tmp" <<HEADER
# outpost-agent for \`kubectl apply\`: deploy/helm/outpost-agent rendered with
# deploy/kubernetes/values.yaml by deploy/kubernetes/render.sh (edit those and rerun it).
# Before applying, replace the placeholder root.json in the ConfigMap with the vendor's and set
# source, expect and permissions in its agent.yaml; then
#   kubectl create namespace outpost && kubectl apply -f outpost-agent.yaml
# The agent reads agent.yaml at start: after a later change to the ConfigMap,
#   kubectl -n outpost rollout restart deployment/outpost-agent
HEADER
printf '%s\n' "$manifests" >> "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
