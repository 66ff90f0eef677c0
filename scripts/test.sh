#!/usr/bin/env bash
# The whole test suite: starts the local stack (installing what is missing), then runs
# every test — unit, integration against the real servers, doc tests — and a short smoke
# of the benchmarks so they cannot rot (criterion benches run once each in test mode;
# the load bench in --smoke mode, which fails if vaultpool loses a query).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.85 or newer)" >&2; exit 1; }
scripts/stack.sh up
cargo test --all-features --all-targets "$@" -- --show-output
cargo test --all-features --doc
set -a
# shellcheck disable=SC1090
. "$(scripts/stack.sh env)"
set +a
cargo run --quiet --all-features --example load_bench -- --smoke
