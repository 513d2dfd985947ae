#!/usr/bin/env bash
# Installs what evoq needs to build and test on Debian bookworm, as root: Debian's PostgreSQL 15
# with its server headers and pg_cron, libclang for pgrx's bindings, sudo (the tests run the
# server as the unprivileged `postgres` user), dpkg-dev (scripts/package.sh's dpkg-shlibdeps),
# and cargo-pgrx 0.18.1. Idempotent: each step is
# skipped when already done, so CI and later runs pay only for what is missing.
set -euo pipefail

packages=(postgresql-15 postgresql-server-dev-15 postgresql-15-cron libclang-dev sudo curl dpkg-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The style step needs rustup's clippy and rustfmt (in rustup's default profile).
for tool in clippy fmt; do
  cargo "$tool" --version >/dev/null 2>&1 || { echo "setup: cargo $tool is missing: rustup component add ${tool/fmt/rustfmt}" >&2; exit 1; }
done

PGRX_VERSION=0.18.1
if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  echo "setup: installing cargo-pgrx $PGRX_VERSION (about 5 minutes on 2 cores)"
  cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --quiet
fi

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
if ! grep -qs "^pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
fi
echo "setup: ready (PostgreSQL $("$PG_CONFIG" --version | awk '{print $2}'), cargo-pgrx $PGRX_VERSION)"
