#!/usr/bin/env bash
# scripts/check-msrv.sh — the dependency and rust-version checks of issue 15 (part 6).
#
# Fails if a Cargo.toml of the workspace or of fuzz/ has a registry dependency
# without a full MAJOR.MINOR.PATCH requirement ('*', "1", "0.4"), if a workspace
# member does not declare the workspace rust-version, or if any package in the
# build (this host, Cargo.lock as it is) declares a newer rust-version than the
# workspace. The checks are the `manifests` test of outboard-tests (so the
# ordinary test run makes them too); this script runs only that test.
# What our own code needs is checked by clippy's incompatible_msrv lint, which
# the declared rust-version turns on (`cargo clippy ... -D warnings`).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --cargo-profile ci -p outboard-tests --test manifests
else
    exec cargo test --profile ci -p outboard-tests --test manifests
fi
