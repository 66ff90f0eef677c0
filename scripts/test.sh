#!/usr/bin/env bash
# The whole test suite: starts the local stack with its Kafka broker (installing what is
# missing), checks the dependency tree (licences, bans, sources), builds the docs
# (warnings are errors), runs a short smoke of the load benchmark (it fails if vaultpool
# loses a query), then every test — unit, integration against the real servers, examples,
# criterion benches once each in test mode — the doc tests, and the fuzz targets for a
# fixed time (VAULTPOOL_FUZZ_SECONDS, default 60, for Vault's answers;
# VAULTPOOL_PROXY_FUZZ_SECONDS, default 30, for the proxy's protocol tracker).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.94 or newer)" >&2; exit 1; }
scripts/stack.sh up --kafka
# Supply chain: licences, bans, sources, and advisories: a known-vulnerable crate fails the
# run. Advisories come from the live RustSec database where GitHub can be reached, else
# from the offline snapshot in ../shared/rustsec/ (this project's CI reaches only
# crates.io, PyPI, Debian and npm), whose date is printed.
CARGO_DENY="$(scripts/tool.sh cargo-deny 0.20.2)"
"$CARGO_DENY" deny --all-features check licenses bans sources
scripts/advisories.sh "$CARGO_DENY"
# The docs build without a broken link or warning.
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --all-features --no-deps
(
  set -a
  # shellcheck disable=SC1090
  . "$(scripts/stack.sh env)"
  set +a
  cargo run --quiet --all-features --example load_bench -- --smoke
)
cargo test --all-features --all-targets --no-fail-fast "$@" -- --show-output
cargo test --all-features --doc
# Fuzz every Vault answer decoder, then the proxy's session tracker and startup parser
# (cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP lets the stable toolchain take them).
# Crashes fail the run and are kept in fuzz/artifacts.
CARGO_FUZZ="$(scripts/tool.sh cargo-fuzz 0.13.2)"
mkdir -p target/fuzz-corpus target/fuzz-corpus-proxy
cp -n fuzz/corpus/envelope/* target/fuzz-corpus/
RUSTC_BOOTSTRAP=1 "$CARGO_FUZZ" fuzz run envelope target/fuzz-corpus fuzz/corpus/envelope -- \
  -max_total_time="${VAULTPOOL_FUZZ_SECONDS:-60}" -max_len=65536
cp -n fuzz/corpus/proxy_protocol/* target/fuzz-corpus-proxy/
RUSTC_BOOTSTRAP=1 "$CARGO_FUZZ" fuzz run proxy_protocol target/fuzz-corpus-proxy \
  fuzz/corpus/proxy_protocol -- \
  -max_total_time="${VAULTPOOL_PROXY_FUZZ_SECONDS:-30}" -max_len=4096
