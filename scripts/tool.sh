#!/usr/bin/env bash
# Print the path of a cargo-installed tool, building it once into a cache outside the
# checkout (so a warm CI run reuses it):  scripts/tool.sh cargo-deny 0.20.2
set -euo pipefail
name=$1 version=$2
root="${VAULTPOOL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vaultpool}/$name-$version"
if [ ! -x "$root/bin/$name" ]; then
  echo "[tool] building $name $version into $root (once)" >&2
  mkdir -p "$root"
  if ! cargo install "$name" --version "$version" --locked --root "$root" \
      --target-dir "$root.build" >"$root.log" 2>&1; then
    tail -30 "$root.log" >&2
    echo "[tool] building $name failed (log: $root.log)" >&2
    exit 1
  fi
  rm -rf "$root.build"
fi
echo "$root/bin/$name"
