#!/usr/bin/env bash
# The main demo: starts the local stack (installing OpenBao, PostgreSQL and Redis if
# missing), loads its env file and runs an example against it — by default
# `rotation_demo`, a live view of a pool rotating its credentials under load.
#
#   scripts/demo.sh [EXAMPLE]     e.g. quickstart, dynamic_db, axum_service, latency
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.94 or newer)" >&2; exit 1; }
example="${1:-rotation_demo}"
scripts/stack.sh up
set -a
# shellcheck disable=SC1090
. "$(scripts/stack.sh env)"
set +a
# Each example logs in as the AppRole whose policy fits it.
case "$example" in
  kv_api_key) prefix=MAXIMUS_AI ;;
  static_db_from_kv|service_config) prefix=INFRASTRUCTURE ;;
  *) prefix=IMMUNE_SYSTEM ;;
esac
role_var="${prefix}_ROLE_ID" secret_var="${prefix}_SECRET_ID"
export VAULT_ROLE_ID="${!role_var}" VAULT_SECRET_ID="${!secret_var}"
# The first build compiles every dependency (≈5 min on 2 cores; later runs take seconds):
# cargo's own progress is shown, so a first run is visibly busy, not silent.
echo "[demo] building the example '$example' (the first build takes ≈5 min on 2 cores)" >&2
cargo build --all-features --example "$example"
exec cargo run --quiet --all-features --example "$example"
