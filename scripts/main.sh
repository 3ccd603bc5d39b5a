#!/usr/bin/env bash
# scripts/main.sh — set up and run Outboard's main job.
#
# Today (issue #2) it:
#   1. installs the system packages it needs (apt-get; skipped when present),
#   2. builds the whole workspace in release mode,
#   3. creates a fresh 4 GiB qcow2 disk, out/disk.qcow2, with outboard-img,
#   4. prints `outboard-img info` and runs `outboard-img check` on it,
#      and `qemu-img check` as an independent cross-check.
# Booting the bundled VMM with that disk and a bridged tap NIC served by the
# vhost-user daemons arrives with issue #6; this script does not boot anything yet.
#
# Set OUTBOARD_KEEP_DISK=1 to keep an existing out/disk.qcow2 instead of recreating it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || die "scripts/main.sh takes no arguments (see --help)"

# 1. system packages
ensure_apt_packages "${OUTBOARD_APT_PACKAGES[@]}"
require_cmd cargo "install the Rust toolchain (rustup) first"

# 2. build
log "building the workspace (release)"
cargo build --release --workspace

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
IMG="$TARGET_DIR/release/outboard-img"
[[ -x "$IMG" ]] || die "$IMG was not built"

# 3. disk
DISK=out/disk.qcow2
mkdir -p out
if [[ "${OUTBOARD_KEEP_DISK:-0}" == 1 && -f "$DISK" ]]; then
    log "keeping existing $DISK (OUTBOARD_KEEP_DISK=1)"
else
    rm -f "$DISK"
    log "creating $DISK (4G)"
    "$IMG" create -f qcow2 "$DISK" 4G
fi

# 4. inspect and check
log "outboard-img info $DISK"
"$IMG" info "$DISK"
log "outboard-img check $DISK"
"$IMG" check "$DISK"
log "qemu-img check $DISK (independent cross-check)"
qemu-img check "$DISK"

cat <<MSG

==> Disk ready: $ROOT/$DISK
==> Not done yet: booting the Outboard VMM with this disk and a bridged tap NIC
    served by vhost-user-blk / vhost-user-net arrives with issue #6.
    The daemons and the VMM are not implemented yet (issues #3-#6).
MSG
