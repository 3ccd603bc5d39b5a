#!/usr/bin/env bash
# scripts/test.sh — THE test command for Outboard (CI runs exactly this via .ci/run).
#
# 1. installs the system packages the tests need (one apt transaction; nothing when all are
#    present) and runs every command the tests call (scripts/lib.sh: OUTBOARD_COMMANDS),
# 2. checks the Rust tools (cargo, rustfmt, clippy, cargo-nextest),
# 3. runs: cargo fmt --check, cargo clippy -D warnings, the doc tests, and every
#    test of the workspace with cargo-nextest (falls back to `cargo test` when
#    nextest is missing),
# 4. prints a summary (steps, and every skipped test with its reason) and exits non-zero
#    if any step failed. Under CI=true only a missing /dev/kvm may skip a test: anything
#    this script installs is never a reason to skip (tests/src/skip.rs fails instead).
#
# All steps run even if an earlier one fails, so one run shows every problem.
# Tests build with the `ci` cargo profile of the root Cargo.toml (dev + opt-level 1).
# Works as root on a fresh Debian 12 machine with CI=true and no stdin.
# OUTBOARD_NO_NEXTEST=1 forces the `cargo test` fallback.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || die "scripts/test.sh takes no arguments (see --help)"

export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

START=$SECONDS

# Tests that cannot run here append "test<TAB>reason" to this file (tests/src/skip.rs).
export OUTBOARD_SKIP_LOG="$ROOT/target/skipped-tests.tsv"
mkdir -p "$ROOT/target"
rm -f "$OUTBOARD_SKIP_LOG"

# --- 1. system packages -------------------------------------------------------
ensure_apt_packages "${OUTBOARD_APT_PACKAGES[@]}"
check_commands "${OUTBOARD_COMMANDS[@]}"

# --- 2. Rust tools --------------------------------------------------------------
require_cmd cargo "install the Rust toolchain (rustup) first"
cargo fmt --version >/dev/null 2>&1 || die "rustfmt missing: rustup component add rustfmt"
cargo clippy --version >/dev/null 2>&1 || die "clippy missing: rustup component add clippy"
if [[ "${OUTBOARD_NO_NEXTEST:-0}" != 1 ]] && cargo nextest --version >/dev/null 2>&1; then
    HAVE_NEXTEST=1
else
    HAVE_NEXTEST=0
    log "cargo-nextest not found: falling back to 'cargo test' (install: cargo install --locked cargo-nextest)"
fi

log "toolchain: $(rustc --version), $(cargo --version)"
if ((HAVE_NEXTEST)); then
    log "nextest: $(cargo nextest --version 2>/dev/null | sed -n 1p)"
fi
log "qemu-img: $(qemu-img --version | sed -n 1p)"

# --- 3. steps -----------------------------------------------------------------
STEP_NAMES=()
STEP_RESULTS=()
STEP_TIMES=()
FAILED=0

# step NAME CMD...: run CMD, record its result and duration; never aborts the script.
step() {
    local name=$1 t0=$SECONDS rc=0
    shift
    printf '\n==> [%s] %s\n' "$name" "$*" >&2
    "$@" || rc=$?
    STEP_NAMES+=("$name")
    STEP_TIMES+=("$((SECONDS - t0))")
    if ((rc == 0)); then
        STEP_RESULTS+=("ok")
    else
        STEP_RESULTS+=("FAILED (exit $rc)")
        FAILED=1
    fi
}

step fmt cargo fmt --all --check
step clippy cargo clippy --profile ci --workspace --all-targets -- -D warnings

if ((HAVE_NEXTEST)); then
    NEXTEST_CONFIG="$ROOT/.config/nextest.toml"
    [[ -f "$NEXTEST_CONFIG" ]] || NEXTEST_CONFIG="$ROOT/scripts/nextest.toml"
    # Doc tests first (nextest can't run them), so nextest's summary closes the log.
    step doctests cargo test --profile ci --workspace --doc
    # The integration tests run the daemons and the VMM as processes; cargo
    # only builds a package's binaries for that package's own tests, so build
    # every binary of the workspace first (vmm has no tests of its own).
    step bins cargo build --profile ci --workspace --bins
    step tests cargo nextest run --cargo-profile ci \
        --config-file "$NEXTEST_CONFIG" --workspace --no-fail-fast --no-tests fail
else
    step bins cargo build --profile ci --workspace --bins
    # cargo test runs unit, integration and doc tests in one go.
    step tests cargo test --profile ci --workspace --no-fail-fast
fi

# --- 4. summary -----------------------------------------------------------------
printf '\n==> scripts/test.sh summary\n'
for i in "${!STEP_NAMES[@]}"; do
    printf '    %-10s %-18s %5ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}"
done
if [[ -e /dev/kvm ]]; then
    KVM="/dev/kvm present$([[ -d /sys/module/kvm_pvm ]] && echo ' (PVM)'): the VMM tests ran"
else
    KVM="/dev/kvm ABSENT: the VMM tests that boot a guest were skipped (listed below)"
fi
printf '    %s\n' "$KVM"
if [[ -s "$OUTBOARD_SKIP_LOG" ]]; then
    printf '    skipped tests: %s\n' "$(wc -l <"$OUTBOARD_SKIP_LOG")"
    sort "$OUTBOARD_SKIP_LOG" | while IFS=$'\t' read -r t why; do
        printf '      %s: %s\n' "$t" "$why"
    done
else
    printf '    skipped tests: none\n'
fi
# Tests marked #[ignore] never run here; list them with their reasons too.
IGNORED="$({ grep -rn --include='*.rs' -A1 '#\[ignore = ' -- */src */tests 2>/dev/null || true; } |
    awk '/#\[ignore = "/ { match($0, /#\[ignore = "[^"]*"/); why = substr($0, RSTART + 12, RLENGTH - 13)
                           split($0, a, ":"); file = a[1]; next }
         /fn [a-z0-9_]+\(/ && why != "" { match($0, /fn [a-z0-9_]+/)
                               printf "      %s::%s: %s\n", file, substr($0, RSTART + 3, RLENGTH - 3), why; why = "" }')"
if [[ -n "$IGNORED" ]]; then
    printf '    tests marked #[ignore] (not run by this script):\n%s\n' "$IGNORED"
fi
TOTAL=$((SECONDS - START))
if ((FAILED)); then
    printf '==> scripts/test.sh: FAILED after %ss (see the steps marked FAILED above)\n' "$TOTAL"
    exit 1
fi
printf '==> scripts/test.sh: all steps ok in %ss\n' "$TOTAL"
