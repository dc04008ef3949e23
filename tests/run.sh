#!/usr/bin/env bash
# The test command (README): installs what the integration tests need, then runs every test.
#   tests/run.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.ci/scripts/setup.sh
export OUTPOST_VENV="${OUTPOST_VENV:-$PWD/.work/venv}"
cargo test --workspace --locked "$@"
