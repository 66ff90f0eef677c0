#!/usr/bin/env bash
# Check the dependency tree against the RustSec advisory database: the live one when
# GitHub answers, else the offline snapshot (a git bundle) in ../shared/rustsec/ — or
# $VAULTPOOL_RUSTSEC_BUNDLE — printing the snapshot's date. A finding fails; no database
# at all fails too (nothing is passed silently).
#
#   scripts/advisories.sh CARGO_DENY_BINARY
set -euo pipefail
cd "$(dirname "$0")/.."
deny=$1
if timeout 20 git ls-remote --exit-code https://github.com/rustsec/advisory-db HEAD >/dev/null 2>&1; then
  echo "advisories: checking against the live RustSec database" >&2
  exec "$deny" deny --all-features check advisories
fi
bundle="${VAULTPOOL_RUSTSEC_BUNDLE:-$(cd .. && pwd)/shared/rustsec/advisory-db.bundle}"
if [ ! -f "$bundle" ]; then
  echo "advisories: NOT CHECKED: GitHub is unreachable and there is no snapshot at $bundle" >&2
  exit 1
fi
# --offline below reads the dependency graph from the local registry: fetch it first.
cargo fetch --quiet
# cargo-deny looks for the default database under <db-path>/advisory-db-<hash of its URL>.
root="$PWD/target/rustsec-snapshot"
db="$root/advisory-db-3157b0e258782691"
rm -rf "$db"
mkdir -p "$root"
git -c init.defaultBranch=main clone -q "$bundle" "$db"
echo "advisories: GitHub unreachable; checking against the RustSec snapshot of $(git -C "$db" log -1 --format=%cs) ($(git -C "$db" rev-parse --short HEAD))" >&2
config="$root/deny.toml"
sed "s|^\[advisories\]|[advisories]\ndb-path = \"$root\"|" deny.toml >"$config"
exec "$deny" deny --offline --all-features --config "$config" check advisories
