#!/usr/bin/env bash
# The proxy benchmark: pgbench (select-only and simple-update, 16 clients, 2 threads)
# directly against PostgreSQL, through vaultpool-proxy, and through pgbouncer 1.18 in
# session mode (Debian's package, installed if missing) — all over loopback TCP, one
# after another on the same machine; then p99 latency through the proxy in the second
# after each rotation against the steady p99 (12 s/20 s leases, a rotation about every
# 15 s, sessions held and handed over). Writes bench-results/proxy.md.
#
#   scripts/proxy_bench.sh            (about 5 minutes; PROXY_BENCH_SECONDS per run, default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${PROXY_BENCH_SECONDS:-20}"
scripts/stack.sh up
set -a
# shellcheck disable=SC1090
. "$(scripts/stack.sh env)"
set +a
if ! command -v pgbouncer >/dev/null; then
  echo "[bench] installing pgbouncer (apt)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null
fi
cargo build --release --all-features --bin vaultpool-proxy
dir=$(mktemp -d)
chmod 755 "$dir"
cleanup() {
  kill "${proxy_pid:-}" "${bouncer_pid:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT
super=(env PGPASSWORD="$VAULTPOOL_PG_SUPER_PASSWORD" PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER=postgres)
scripts/bench_schema.sh

# vaultpool-proxy: "app" on 2 h leases (steady), "rot" on 12 s/20 s leases (rotating).
proxy_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo "bench-local-secret" >"$dir/secret"
cat >"$dir/proxy.toml" <<TOML
[listen]
tcp = "127.0.0.1:$proxy_port"
scram_secret_file = "$dir/secret"
http = "127.0.0.1:0"
[[database]]
name = "app"
role = "immune-readwrite"
host = "$PGHOST"
port = $PGPORT
dbname = "adaptive_immunity"
max_connections = 32
[[database]]
name = "rot"
role = "demo-rotating"
host = "$PGHOST"
port = $PGPORT
dbname = "adaptive_immunity"
max_connections = 32
TOML
VAULT_ROLE_ID="$IMMUNE_SYSTEM_ROLE_ID" VAULT_SECRET_ID="$IMMUNE_SYSTEM_SECRET_ID" RUST_LOG=warn \
  target/release/vaultpool-proxy --config "$dir/proxy.toml" >"$dir/ready" &
proxy_pid=$!
for _ in $(seq 100); do grep -q ready "$dir/ready" 2>/dev/null && break; sleep 0.1; done
http=$(sed -n 's/.*http \([0-9.:]*\).*/\1/p' "$dir/ready")

# pgbouncer, session mode, logging in to PostgreSQL with a static password.
bouncer_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
echo '"bench" ""' >"$dir/users.txt"
cat >"$dir/pgbouncer.ini" <<INI
[databases]
app = host=$PGHOST port=$PGPORT dbname=adaptive_immunity user=bench_static password=bench-static
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $dir/users.txt
pool_mode = session
max_client_conn = 100
default_pool_size = 32
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
chown -R postgres "$dir" 2>/dev/null || true
pgbouncer -u postgres "$dir/pgbouncer.ini" &
bouncer_pid=$!
sleep 1

direct=(PGHOST=127.0.0.1 PGPORT="$PGPORT" PGUSER=bench_static PGPASSWORD=bench-static PGDATABASE=adaptive_immunity)
proxied=(PGHOST=127.0.0.1 PGPORT="$proxy_port" PGUSER=app PGPASSWORD=bench-local-secret PGDATABASE=app PGOPTIONS="-c search_path=bench")
bounced=(-u PGPASSWORD -u PGOPTIONS PGHOST=127.0.0.1 PGPORT="$bouncer_port" PGUSER=bench PGDATABASE=app)
bench() { # label mode-flag env...
  local label=$1 flag=$2; shift 2
  local out tps lat failed
  out=$(env "$@" pgbench -c 16 -j 2 -T "$secs" -n "$flag" 2>&1) || true
  tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' <<<"$out")
  lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' <<<"$out")
  failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
  printf '| %s | %s | %s | %s |\n' "$label" "${tps%.*}" "$lat" "${failed:-?}"
  grep -m1 -E 'error|aborted' <<<"$out" >&2 || true
}
report="bench-results/proxy.md"
mkdir -p bench-results
{
  echo "### pgbench: direct, through vaultpool-proxy, through pgbouncer 1.18 (session mode)"
  echo
  echo "$(date -u +%F), $(nproc) cores, ${secs} s per run, \`-c 16 -j 2\`, TCP on loopback, one run each, in this order. \`scripts/proxy_bench.sh\`."
  echo
  echo "| path | tps | latency average (ms) | failed |"
  echo "|---|---|---|---|"
  for mode in "select-only:-S" "simple-update:-N"; do
    name=${mode%%:*} flag=${mode#*:}
    echo "| *$name* | | | |"
    bench "direct (static password)" "$flag" "${direct[@]}"
    bench "vaultpool-proxy (leased login, SCRAM to the proxy)" "$flag" "${proxied[@]}"
    bench "pgbouncer 1.18, session mode (static password)" "$flag" "${bounced[@]}"
  done
} | tee "$report"

# p99 in the second after each rotation vs steady, through the proxy (sessions held).
gens="$dir/generations"
(
  while kill -0 "$proxy_pid" 2>/dev/null; do
    printf '%s %s\n' "$(date +%s.%N)" "$(curl -s "http://$http/metrics" | sed -n 's/^vaultpool_proxy_generation{database="rot"} //p')"
    sleep 0.1
  done
) >"$gens" &
poller=$!
(cd "$dir" && env PGHOST=127.0.0.1 PGPORT="$proxy_port" PGUSER=app PGPASSWORD=bench-local-secret PGDATABASE=rot PGOPTIONS="-c search_path=bench" \
  pgbench -c 16 -j 2 -T 60 -n -S -l --log-prefix=rot >/dev/null 2>&1)
kill "$poller" 2>/dev/null || true
python3 - "$dir" "$gens" <<'PY' | tee -a "$report"
import glob, sys
d, gens = sys.argv[1], sys.argv[2]
lat = []  # (end time s, latency ms)
for f in glob.glob(f"{d}/rot.*"):
    for line in open(f):
        p = line.split()
        if len(p) >= 6:
            lat.append((int(p[4]) + int(p[5]) / 1e6, int(p[2]) / 1000.0))
changes, last = [], None
for line in open(gens):
    p = line.split()
    if len(p) == 2:
        if last is not None and p[1] != last:
            changes.append(float(p[0]))
        last = p[1]
def p99(v):
    v = sorted(v)
    return v[int(len(v) * 0.99)] if v else float("nan")
during = [l for t, l in lat if any(c - 0.1 <= t < c + 1.0 for c in changes)]
steady = [l for t, l in lat if not any(c - 0.1 <= t < c + 1.0 for c in changes)]
print()
print(f"### Rotation through the proxy: pgbench -S -c 16 -j 2 -T 60, 16 sessions held, {len(changes)} rotations (12 s/20 s leases)")
print()
print("| transactions | p99 steady | p99 in the second after a rotation | ratio |")
print("|---|---|---|---|")
print(f"| {len(lat)} | {p99(steady):.2f} ms | {p99(during):.2f} ms | {p99(during) / p99(steady):.2f} |")
PY
echo "wrote $report" >&2
