#!/usr/bin/env bash
# scripts/main.sh [COMMAND...] — set up and run Outboard's main job.
#
#   1. installs the system packages it needs (apt-get; skipped when present),
#   2. builds the whole workspace in release mode,
#   3. creates a fresh 4 GiB qcow2 disk, out/disk.qcow2, with outboard-img and checks it
#      (outboard-img check, and qemu-img check as an independent cross-check),
#   4. boots a guest under the outboard VMM (KVM) with that disk, served by vhost-user-blk,
#      and, when vhost-user-net is built, a tap NIC on a bridge served by vhost-user-net
#      (bridge and tap live in a network namespace "outboard-main" this script creates,
#      with the bridge at 10.0.77.1/24; the guest is 10.0.77.2),
#   5. shows the guest's shell on the serial console (stdin a terminal, no COMMAND), or runs
#      COMMAND in the guest and exits with its status (without a terminal and without a
#      COMMAND, a short demo command runs).
#
# Guest: on a PVM host (/sys/module/kvm_pvm) the PVM kernel ../shared/guest/vmlinux (or
# $OUTBOARD_KERNEL) with a busybox initramfs; on hardware KVM the Debian test guest.
# Set OUTBOARD_KEEP_DISK=1 to keep an existing out/disk.qcow2 instead of recreating it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi

# 1. system packages
ensure_apt_packages "${OUTBOARD_APT_PACKAGES[@]}"
check_commands "${OUTBOARD_COMMANDS[@]}"
require_cmd cargo "install the Rust toolchain (rustup) first"

# 2. build
log "building the workspace (release)"
cargo build --release --workspace

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
IMG="$BIN/outboard-img"
[[ -x "$IMG" && -x "$BIN/outboard" && -x "$BIN/vhost-user-blk" ]] || die "release binaries were not built"

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
log "outboard-img info $DISK"
"$IMG" info "$DISK"
log "outboard-img check $DISK"
"$IMG" check "$DISK"
log "qemu-img check $DISK (independent cross-check)"
qemu-img check "$DISK"

# 4. guest
[[ -e /dev/kvm ]] || die "/dev/kvm is missing: the disk is ready, but booting needs KVM"
if [[ -d /sys/module/kvm_pvm ]]; then
    KERNEL="${OUTBOARD_KERNEL:-$ROOT/../shared/guest/vmlinux}"
    [[ -f "$KERNEL" ]] || die "PVM host: guest kernel $KERNEL not found (set OUTBOARD_KERNEL)"
    bash scripts/guest/build-pvm-initramfs.sh "$TARGET_DIR/guest"
    INITRD="$TARGET_DIR/guest/pvm-initramfs.cpio.gz"
else
    bash scripts/guest/build-guest.sh "$TARGET_DIR/guest"
    KERNEL="${OUTBOARD_KERNEL:-$TARGET_DIR/guest/vmlinuz}"
    INITRD="$TARGET_DIR/guest/initramfs.cpio.gz"
fi

VM=("$BIN/outboard" --kernel "$KERNEL" --initramfs "$INITRD" --cpus 2 --memory 512M
    --disk "path=$ROOT/$DISK,format=qcow2")
CMDLINE="console=ttyS0 panic=-1 quiet 8250.nr_uarts=1"
WAIT="vda"
NETNS=()
if [[ -x "$BIN/vhost-user-net" ]]; then
    NS=outboard-main
    ip netns del "$NS" 2>/dev/null || true
    ip netns add "$NS"
    trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
    ip -n "$NS" link set lo up
    ip -n "$NS" link add obbr0 type bridge
    ip -n "$NS" addr add 10.0.77.1/24 dev obbr0
    ip -n "$NS" link set obbr0 up
    VM+=(--net "tap=obtap0,bridge=obbr0,mac=52:54:00:77:00:02")
    NETNS=(ip netns exec "$NS")
    WAIT="vda,net"
    log "network: guest NIC on bridge obbr0 (10.0.77.1/24) in network namespace $NS"
else
    log "network: $BIN/vhost-user-net not built; booting without a NIC"
fi

SCRIPT=""
if (($# > 0)); then
    SCRIPT="$*"
elif [[ ! -t 0 ]]; then
    SCRIPT='uname -r; echo "cpus: $(nproc)"; cat /proc/partitions; ip -br link 2>/dev/null
if [ -e /sys/class/net/eth0 ]; then ip link set eth0 up; ip addr add 10.0.77.2/24 dev eth0; ping -c 2 -W 3 10.0.77.1; fi'
fi
if [[ -n "$SCRIPT" ]]; then
    CMDLINE+=" ob_wait=$WAIT ob_script=$(printf '%s\n' "$SCRIPT" | base64 -w0)"
    log "booting the guest and running: $SCRIPT"
else
    log "booting the guest: shell on this terminal (poweroff -f to quit)"
fi
set +e
"${NETNS[@]}" "${VM[@]}" --cmdline "$CMDLINE" | tee out/serial.log
VMM_STATUS=${PIPESTATUS[0]}
set -e
((VMM_STATUS == 0)) || die "outboard exited with status $VMM_STATUS"
if [[ -n "$SCRIPT" ]]; then
    GUEST_STATUS="$(sed -n 's/^OB_EXIT=\([0-9]*\).*/\1/p' out/serial.log | tail -n1)"
    log "guest command exited with status ${GUEST_STATUS:-?}"
    [[ "${GUEST_STATUS:-1}" == 0 ]] || exit 1
fi
