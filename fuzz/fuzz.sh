#!/usr/bin/env bash
# Builds and runs the fuzz targets with libFuzzer on the stable toolchain (coverage
# instrumentation only: the code under test is safe Rust, so no AddressSanitizer).
#   fuzz/fuzz.sh build                 build every target
#   fuzz/fuzz.sh smoke [RUNS]          each target over its seeds plus RUNS inputs (CI)
#   fuzz/fuzz.sh run TARGET [ARGS...]  one campaign; ARGS go to libFuzzer (-runs=, -max_total_time=)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
triple=$(rustc -vV | sed -n 's/^host: //p')
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^outpost-fuzz$')
# --target keeps these flags off build scripts and proc macros, as cargo-fuzz does.
build() {
    RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks" \
        cargo build --release --locked --target "$triple" --bins
}
run() {
    local target=$1
    shift
    local work="target/corpus/$target"
    mkdir -p "$work" artifacts/"$target"
    # New findings go to target/corpus (not committed); the seeds stay read-only.
    "target/$triple/release/$target" -artifact_prefix=artifacts/"$target"/ -max_len=65536 \
        "$@" "$work" "corpus/$target"
}
case "${1:-}" in
    build) build ;;
    smoke)
        build
        for target in $targets; do
            echo "== fuzz smoke: $target"
            run "$target" -runs="${2:-20000}" 2>&1 | tail -n 2
        done
        ;;
    run)
        [[ $# -ge 2 ]] || { echo "usage: fuzz/fuzz.sh run TARGET [libFuzzer args]" >&2; exit 2; }
        build
        target=$2
        shift 2
        run "$target" "$@"
        ;;
    *) sed -n '2,6p' "$0" >&2; exit 2 ;;
esac
