#!/usr/bin/env bash
# Install the external tools the integration tests use (Debian 12, run as root).
# Idempotent: only missing packages are installed, apt lists are refreshed only
# when needed, and the Python venv is created/filled only if incomplete.
#
#   .ci/scripts/setup.sh            # then: export PATH="$REPO/.work/venv/bin:$PATH" (optional)
#
# Env: OUTPOST_VENV overrides the venv location (default: $REPO/.work/venv).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${OUTPOST_VENV:-$REPO/.work/venv}"
APT_PKGS=(docker-registry apache2-utils skopeo openssl git curl docker.io podman runc busybox-static netavark aardvark-dns systemd prometheus buildah)
# IMPORT[=PIP_SPEC]: the module that must import, and what pip installs when it does not.
PY_PKGS=(cryptography oras kubernetes_validate yaml=PyYAML helm_python=helm-python-sdk==0.2.2 "moto=moto[server]==5.2.5")

export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

log() { printf 'setup: %s\n' "$*"; }

pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for p in "${APT_PKGS[@]}"; do
    pkg_installed "$p" || missing+=("$p")
done
if [ ! -x "$VENV/bin/python" ] && ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    # Refresh the package lists only if they are absent or don't know a missing package.
    need_update=0
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
        need_update=1
    else
        for p in "${missing[@]}"; do
            cand="$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')"
            if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; break; fi
        done
    fi
    if [ "$need_update" -eq 1 ]; then
        log "apt-get update"
        $SUDO apt-get update -qq
    fi
    log "apt-get install ${missing[*]}"
    if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        [ "$need_update" -eq 0 ] || exit 1
        # Stale lists (e.g. 404 on an old version): refresh once and retry.
        log "apt-get install failed; apt-get update and retry"
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    log "apt packages already installed: ${APT_PKGS[*]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        # Debian's python3 needs python3-venv (ensurepip) for `-m venv`.
        rm -rf "$VENV"
        log "apt-get install python3-venv"
        $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        python3 -m venv "$VENV"
    fi
fi

py_missing=()
for p in "${PY_PKGS[@]}"; do
    "$VENV/bin/python" -c "import ${p%%=*}" >/dev/null 2>&1 || py_missing+=("${p#*=}")
done
if [ "${#py_missing[@]}" -gt 0 ]; then
    log "pip install ${py_missing[*]}"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${py_missing[@]}"
else
    log "python packages already in venv: ${PY_PKGS[*]}"
fi

log "docker-registry $(/usr/bin/docker-registry --version 2>/dev/null | awk '{print $NF}')," \
    "$(skopeo --version 2>/dev/null)," \
    "oras $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("oras"))')," \
    "cryptography $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("cryptography"))')," \
    "helm-python-sdk $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("helm-python-sdk"))')"
log "venv: $VENV"
