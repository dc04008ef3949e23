#!/usr/bin/env bash
# Agent benchmarks, one command: builds the release binaries, then runs tests/benches/agent.rs.
#   tests/bench.sh            # all: dir, oci, idle (each source and engine, OUTPOST_BENCH_IDLE_SECS each, default 120), rollout, snapshot
#   tests/bench.sh dir|oci|idle|rollout   (rollout: OUTPOST_BENCH_REPLICAS containers, default 50,
#                                         # beside docker-compose up -d of the same containers)
#   tests/bench.sh snapshot               # downtime a snapshot adds to a stateful replace (100 MiB, 1 GiB)
#   tests/bench.sh bundle                 # agent peak RSS accepting bundles carrying a 1 GiB and a
#                                         # 4 GiB image (OUTPOST_BENCH_BUNDLE_MIB, default "1024 4096")
#   tests/bench.sh vm                     # VM pools on moto: 20 replicas on 5 machines, idle cloud calls, RSS
#   tests/bench.sh amplification          # hostile layouts: time and peak RSS at two sizes
#   tests/bench.sh interrupts             # kill -9 and SIGTERM campaigns on dockerd, Podman and the
#                                         # Kubernetes stand-in, OUTPOST_INTERRUPT_ROUNDS rounds each
#                                         # (default 30)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = amplification ]; then
    exec cargo bench --locked -p outpost-tests --bench amplification
fi
bash .ci/scripts/setup.sh >/dev/null
if [ "${1:-}" = interrupts ]; then
    export OUTPOST_VENV="${OUTPOST_VENV:-$PWD/.work/venv}"
    OUTPOST_INTERRUPT_ROUNDS="${OUTPOST_INTERRUPT_ROUNDS:-30}" exec cargo test --locked \
        --workspace --test runtime_docker --test agent_kubernetes -- --test-threads 1 \
        during_rollouts
fi
if [ -z "${1:-}" ] || [ "${1:-}" = rollout ]; then
    # The rollout bench compares with Debian's docker-compose 1.29 on the same engine.
    command -v docker-compose >/dev/null || apt-get install -y -qq docker-compose >/dev/null \
        || echo "bench: docker-compose could not be installed; the rollout bench runs without it"
fi
cargo build --release --locked -p outpost-agent -p outpost-signer
cargo bench --locked -p outpost-tests --bench agent -- "${1:-}"
