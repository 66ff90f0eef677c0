#!/usr/bin/env bash
# The main demo: starts the local stack (installing OpenBao, PostgreSQL and Redis if
# missing), loads its env file and runs an example against it — by default
# `rotation_demo`, a live view of a pool rotating its credentials under load.
#
#   scripts/demo.sh [EXAMPLE]     e.g. quickstart, dynamic_db, axum_service, latency
#   scripts/demo.sh proxy         pgbench through vaultpool-proxy across rotations
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.94 or newer)" >&2; exit 1; }
example="${1:-rotation_demo}"
scripts/stack.sh up
set -a
# shellcheck disable=SC1090
. "$(scripts/stack.sh env)"
set +a
if [ "$example" = proxy ]; then
  # vaultpool-proxy: pgbench (a client nobody here wrote) through the sidecar for 60 s,
  # 16 sessions held the whole run, on leases of 12 s renewable to 20 s: they rotate by
  # schedule about every 15 s, and the sessions are handed over between transactions.
  export VAULT_ROLE_ID="$IMMUNE_SYSTEM_ROLE_ID" VAULT_SECRET_ID="$IMMUNE_SYSTEM_SECRET_ID"
  unset VAULT_TOKEN
  echo "[demo] building vaultpool-proxy (the first build takes a few minutes on 2 cores)" >&2
  cargo build --features proxy --bin vaultpool-proxy
  dir=$(mktemp -d)
  trap 'kill "${proxy_pid:-}" 2>/dev/null || true; rm -rf "$dir"' EXIT
  scripts/bench_schema.sh
  port=6432
  cat >"$dir/proxy.toml" <<TOML
[listen]
tcp = "127.0.0.1:$port"
unix_dir = "$dir"
http = "127.0.0.1:0"

[[database]]
name = "app"
role = "demo-rotating"
host = "$PGHOST"
port = $PGPORT
dbname = "adaptive_immunity"
max_connections = 16
TOML
  target/debug/vaultpool-proxy --config "$dir/proxy.toml" >"$dir/ready" &
  proxy_pid=$!
  for _ in $(seq 100); do grep -q ready "$dir/ready" 2>/dev/null && break; sleep 0.1; done
  cat "$dir/ready"
  http=$(sed -n 's/.*http \([0-9.:]*\).*/\1/p' "$dir/ready")
  echo "[demo] pgbench -c 16 -j 2 -T 60 through the proxy's Unix socket (no password anywhere)" >&2
  env -u PGPASSWORD PGHOST="$dir" PGPORT=$port PGUSER=app PGOPTIONS="-c search_path=bench" \
    pgbench -c 16 -j 2 -T 60 -P 10 -n app
  echo "[demo] the proxy's metrics:" >&2
  curl -s "http://$http/metrics" | grep -E '^vaultpool_proxy_(rotations|handovers|sessions_total|server_logins)'
  kill -TERM "$proxy_pid"
  wait "$proxy_pid" 2>/dev/null || true
  exit 0
fi
# Each example logs in as the AppRole whose policy fits it.
case "$example" in
  kv_api_key) prefix=MAXIMUS_AI ;;
  static_db_from_kv|service_config) prefix=INFRASTRUCTURE ;;
  *) prefix=IMMUNE_SYSTEM ;;
esac
role_var="${prefix}_ROLE_ID" secret_var="${prefix}_SECRET_ID"
export VAULT_ROLE_ID="${!role_var}" VAULT_SECRET_ID="${!secret_var}"
# Only the features the example needs (its `required-features` in Cargo.toml): a first
# run compiles no Kafka, sqlx, Redis or axum it does not use. The first build compiles
# every dependency it does need (a few minutes on 2 cores; later runs take seconds):
# cargo's own progress is shown, so a first run is visibly busy, not silent.
features=$(python3 - "$example" <<'PY'
import sys, tomllib
with open("Cargo.toml", "rb") as f:
    manifest = tomllib.load(f)
for ex in manifest.get("example", []):
    if ex["name"] == sys.argv[1]:
        print(",".join(ex.get("required-features", [])))
PY
)
echo "[demo] building the example '$example' (features: ${features:-none}; the first build takes a few minutes on 2 cores)" >&2
cargo build --features "$features" --example "$example"
exec cargo run --quiet --features "$features" --example "$example"
