#!/usr/bin/env bash
# The whole test suite: starts the local stack (installing what is missing), builds the
# docs (warnings are errors), runs a short smoke of the load benchmark (it fails if vaultpool loses a query), then every test —
# unit, integration against the real servers, examples, criterion benches once each in
# test mode — and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.85 or newer)" >&2; exit 1; }
scripts/stack.sh up --kafka
# The docs build without a broken link or warning.
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --all-features --no-deps
(
  set -a
  # shellcheck disable=SC1090
  . "$(scripts/stack.sh env)"
  set +a
  cargo run --quiet --all-features --example load_bench -- --smoke
)
cargo test --all-features --all-targets "$@" -- --show-output
cargo test --all-features --doc
