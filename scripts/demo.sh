#!/usr/bin/env bash
# The main demo: starts the local stack (installing OpenBao, PostgreSQL and Redis if
# missing), loads its env file and runs the quickstart example against it.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.85 or newer)" >&2; exit 1; }
scripts/stack.sh up
set -a
# shellcheck disable=SC1090
. "$(scripts/stack.sh env)"
set +a
# The demo service logs in as the immune-system AppRole.
export VAULT_ROLE_ID="$IMMUNE_SYSTEM_ROLE_ID" VAULT_SECRET_ID="$IMMUNE_SYSTEM_SECRET_ID"
exec cargo run --quiet --example "${1:-quickstart}"
