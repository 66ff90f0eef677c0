#!/usr/bin/env bash
# pgbench's tables for the proxy demo and benchmark, in the schema `bench` of the stack's
# `adaptive_immunity`, owned by app_owner and usable through grants to PUBLIC: not in
# `public`, whose tables every leased user gets a grant on (an ACL entry per user and
# table — with 1,000 users alive every lease gets slower). Run with the stack's env loaded.
set -euo pipefail
super=(env PGPASSWORD="$VAULTPOOL_PG_SUPER_PASSWORD" PGHOST="$PGHOST" PGPORT="$PGPORT" PGUSER=postgres)
"${super[@]}" psql -q -d adaptive_immunity -c "SET ROLE app_owner; CREATE SCHEMA IF NOT EXISTS bench"
if ! "${super[@]}" psql -d adaptive_immunity -Atc \
    "SELECT 1 FROM pg_tables WHERE schemaname = 'bench' AND tablename = 'pgbench_accounts'" | grep -q 1; then
  "${super[@]}" PGOPTIONS="-c role=app_owner -c search_path=bench" pgbench -i -s 1 -q adaptive_immunity
fi
"${super[@]}" psql -q -d adaptive_immunity -c "SET ROLE app_owner; GRANT USAGE ON SCHEMA bench TO PUBLIC; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA bench TO PUBLIC"
# A static login for the comparisons (direct, pgbouncer): search_path bench as its role
# default, so a session reset (pgbouncer's DISCARD ALL) keeps it.
"${super[@]}" psql -q -d adaptive_immunity -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bench_static') THEN CREATE ROLE bench_static LOGIN PASSWORD 'bench-static'; END IF; END \$\$; ALTER ROLE bench_static SET search_path = bench"
