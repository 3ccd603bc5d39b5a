#!/usr/bin/env bash
# scripts/main.sh [--rebuild-base] [COMMAND...] — set up and run Outboard's main job: a real
# Debian 12 guest on a qcow2 overlay served by vhost-user-blk, under the outboard VMM.
#
#   1. checks the machine: root, /dev/kvm, the guest kernel (on a PVM host the PVM guest
#      kernel ../shared/guest/vmlinux, or $OUTBOARD_KERNEL, and nothing else boots there),
#   2. installs the system packages it needs (apt-get; skipped when present),
#   3. builds the workspace in release mode ($OUTBOARD_BIN_DIR=DIR: use the binaries in DIR),
#   4. builds the Debian 12 base image once (scripts/guest/build-debian.sh: debootstrap
#      minbase from the machine's Debian mirror, ext4, outboard-img convert) and caches it in
#      target/debian/debian-base.qcow2; --rebuild-base or OUTBOARD_DEBIAN_REBUILD=1 rebuilds it,
#   5. creates a fresh overlay out/overlay.qcow2 on top of it (outboard-img create -b: a
#      backing chain, as cloud images are used),
#   6. serves the overlay with vhost-user-blk (control socket out/run/blk-ctl.sock) and a tap
#      NIC with vhost-user-net on a bridge obbr0 (10.0.77.1/24) in a network namespace
#      "outboard-main" this script creates; the guest is 10.0.77.2,
#   7. boots the guest (kernel command line root=/dev/vda init=/sbin/outboard-init; that init
#      mounts the API file systems, brings up the NIC, runs the shell or the command and
#      powers off):
#        - on a terminal without COMMAND: a root shell in the Debian guest ('exit' leaves),
#        - with COMMAND: runs it in the guest (bash, as root) and exits with its status,
#        - without a terminal and without COMMAND: the demo (Debian's version, dpkg and apt,
#          a ping of the bridge, fio writing while the host takes a live internal snapshot
#          through the control socket),
#   8. afterwards: outboard-img snapshot -l, outboard-img check and qemu-img check on the
#      overlay.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
fi
REBUILD_BASE="${OUTBOARD_DEBIAN_REBUILD:-0}"
if [[ "${1:-}" == "--rebuild-base" ]]; then
    REBUILD_BASE=1
    shift
fi
T0=$SECONDS

# 1. the machine
((EUID == 0)) || die "scripts/main.sh must run as root: it creates a network namespace, a bridge
and a tap, runs debootstrap and installs packages. Run it as root (e.g. sudo scripts/main.sh)."
[[ -e /dev/kvm ]] || die "/dev/kvm is missing: the outboard VMM needs KVM (load kvm_intel/kvm_amd
or kvm_pvm, or run on a machine or VM with virtualization enabled)"
[[ -c /dev/kvm && -r /dev/kvm && -w /dev/kvm ]] || die "/dev/kvm is not a usable KVM device here"
SHARED_GUEST="$ROOT/../shared/guest"
if [[ -d /sys/module/kvm_pvm ]]; then
    KERNEL="${OUTBOARD_KERNEL:-$SHARED_GUEST/vmlinux}"
    [[ -f "$KERNEL" ]] || die "PVM host: guest kernel $KERNEL not found (set OUTBOARD_KERNEL)"
    # The PVM guest patch prints this line; the uncompressed vmlinux carries it. A bzImage is
    # accepted when it is the one of ../shared/guest/SHA256SUMS.
    if ! grep -aqF 'pvm-pv: native mode enabled' "$KERNEL" &&
        ! grep -qF "$(sha256sum "$KERNEL" | cut -d' ' -f1)" "$SHARED_GUEST/SHA256SUMS" 2>/dev/null; then
        die "this host's /dev/kvm is PVM (/sys/module/kvm_pvm), and $KERNEL is not the PVM guest
kernel (no pvm-pv marker in it, not in $SHARED_GUEST/SHA256SUMS). Only a kernel built with
CONFIG_PVM_PV_GUEST boots here; a stock kernel never leaves the host's emulator. Use
$SHARED_GUEST/vmlinux (see $SHARED_GUEST/README.md) or unset OUTBOARD_KERNEL."
    fi
    INITRD=()
else
    # Hardware KVM: any kernel with virtio-pci, virtio-blk, virtio-net and ext4 built in
    # (outboard loads no modules before the root file system is mounted).
    KERNEL="${OUTBOARD_KERNEL:-}"
    [[ -n "$KERNEL" && -f "$KERNEL" ]] || die "hardware KVM: set OUTBOARD_KERNEL to a kernel with
virtio-pci, virtio-blk, virtio-net and ext4 built in (a vmlinux or bzImage; e.g. a build of
$SHARED_GUEST/pvm-guest.fragment without CONFIG_PVM_PV_GUEST), and OUTBOARD_INITRD to an
initramfs if it needs one"
    INITRD=()
    [[ -z "${OUTBOARD_INITRD:-}" ]] || INITRD=(--initramfs "$OUTBOARD_INITRD")
fi

# 2. system packages
ensure_apt_packages "${OUTBOARD_APT_PACKAGES[@]}"
check_commands "${OUTBOARD_COMMANDS[@]}"

# 3. binaries
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
OUT="${OUTBOARD_OUT_DIR:-$ROOT/out}"
if [[ -n "${OUTBOARD_BIN_DIR:-}" ]]; then
    BIN="$(cd "$OUTBOARD_BIN_DIR" && pwd)"
    log "using the binaries in $BIN (OUTBOARD_BIN_DIR)"
else
    require_cmd cargo "install the Rust toolchain (rustup) first"
    log "building the workspace (release)"
    cargo build --release --workspace
    BIN="$TARGET_DIR/release"
fi
IMG="$BIN/outboard-img"
for b in outboard-img outboard vhost-user-blk; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing (cargo build --release --workspace)"
done

# 4. the Debian base image (cached)
BASE_DIR="$TARGET_DIR/debian"
t=$SECONDS
build_args=(--img "$IMG")
((REBUILD_BASE != 1)) || build_args+=(--rebuild)
bash scripts/guest/build-debian.sh "${build_args[@]}" "$BASE_DIR"
BASE="$BASE_DIR/debian-base.qcow2"
log "base image ready in $((SECONDS - t)) s: $BASE"

# 5. this run's overlay
mkdir -p "$OUT"
OVERLAY="$OUT/overlay.qcow2"
rm -f "$OVERLAY"
"$IMG" create -q -f qcow2 -b "$BASE" -F qcow2 "$OVERLAY"
log "outboard-img info --backing-chain $OVERLAY"
"$IMG" info --backing-chain "$OVERLAY" | grep -E '^(image|file format|virtual size|disk size|backing file( format)?):' >&2

# 6. backends: vhost-user-blk with a control socket (started here so the host can reach it),
# vhost-user-net started by the VMM inside the network namespace.
RUN="$OUT/run"
rm -rf "$RUN"
mkdir -p "$RUN"
BLK_SOCK="$RUN/blk.sock"
CTL="$RUN/blk-ctl.sock"
BLK_PID=""
NS=""
WATCH_PID=""
cleanup() {
    [[ -z "$WATCH_PID" ]] || kill "$WATCH_PID" 2>/dev/null || true
    if [[ -n "$BLK_PID" ]]; then
        kill -TERM "$BLK_PID" 2>/dev/null || true
        wait "$BLK_PID" 2>/dev/null || true
    fi
    [[ -z "$NS" ]] || ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
"$BIN/vhost-user-blk" --socket-path "$BLK_SOCK" --blk-file "$OVERLAY" --format qcow2 \
    --num-queues 2 --serial outboard-root --control-socket "$CTL" >"$OUT/vhost-user-blk.log" 2>&1 &
BLK_PID=$!
for ((i = 0; i < 100; i++)); do
    [[ -S "$BLK_SOCK" && -S "$CTL" ]] && break
    kill -0 "$BLK_PID" 2>/dev/null || die "vhost-user-blk exited: $(cat "$OUT/vhost-user-blk.log")"
    sleep 0.1
done
[[ -S "$BLK_SOCK" ]] || die "vhost-user-blk did not create $BLK_SOCK within 10 s"
log "vhost-user-blk (pid $BLK_PID) serves $OVERLAY; control socket $CTL"

VM=("$BIN/outboard" --kernel "$KERNEL" "${INITRD[@]}" --cpus 2 --memory 1G --disk "socket=$BLK_SOCK")
CMDLINE="console=ttyS0 panic=-1 quiet 8250.nr_uarts=1 root=/dev/vda rootfstype=ext4 rw init=/sbin/outboard-init"
NETNS=()
if [[ -x "$BIN/vhost-user-net" ]]; then
    NS=outboard-main
    ip netns del "$NS" 2>/dev/null || true
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add obbr0 type bridge
    ip -n "$NS" addr add 10.0.77.1/24 dev obbr0
    ip -n "$NS" link set obbr0 up
    VM+=(--net "tap=obtap0,bridge=obbr0,mac=52:54:00:77:00:02")
    NETNS=(ip netns exec "$NS")
    CMDLINE+=" ob_ip=10.0.77.2/24"
    log "network: guest NIC on bridge obbr0 (10.0.77.1/24) in network namespace $NS; guest 10.0.77.2"
else
    log "network: $BIN/vhost-user-net not built; booting without a NIC"
fi

# The demo: what runs in the guest without a terminal and without COMMAND. It prints
# OB_DEMO_WRITING when fio starts writing; the host then takes the live snapshot.
# shellcheck disable=SC2016 # expanded in the guest
DEMO='set -e
. /etc/os-release
echo "guest: $PRETTY_NAME, /etc/debian_version $(cat /etc/debian_version), kernel $(uname -r), $(nproc) vCPUs, PID 1 $(cat /proc/1/comm)"
echo "guest: root $(findmnt -no SOURCE,FSTYPE,OPTIONS /)"
echo "guest: dpkg: $(dpkg-query -W | wc -l) packages installed; $(apt-get --version | head -n1)"
ip -br -4 addr show scope global
ping -c 2 -W 5 10.0.77.1
echo "outboard demo, guest boot $(cat /proc/sys/kernel/random/boot_id)" >/root/outboard-demo.txt
sync
echo "guest: wrote /root/outboard-demo.txt: $(cat /root/outboard-demo.txt)"
dd if=/dev/zero of=/root/live.dat bs=1M count=64 oflag=direct status=none
echo OB_DEMO_WRITING
fio --name=live --filename=/root/live.dat --size=64M --bs=64k --rw=randwrite --direct=1 \
  --ioengine=psync --time_based --runtime=8 --verify=crc32c --verify_backlog=64 \
  --verify_fatal=1 >/tmp/fio.out || { cat /tmp/fio.out; exit 1; }
sed -n "s/^ *WRITE: \(bw=[^ ]*\).*\(io=[^ ]*\).*/guest: fio: random 64k writes for 8 s: \1, \2/p" /tmp/fio.out
sed -n "s/.*issued rwts: total=\([0-9]*\),\([0-9]*\),.*/guest: fio: \1 of the \2 blocks written read back, crc32c verified, 0 errors/p" /tmp/fio.out
sync
echo OB_DEMO_DONE'

SCRIPT=""
MODE=interactive
if (($# > 0)); then
    SCRIPT="$*"
    MODE="command"
elif [[ ! -t 0 ]]; then
    SCRIPT="$DEMO"
    MODE=demo
fi
if [[ -n "$SCRIPT" ]]; then
    CMDLINE+=" ob_cmd=$(printf '%s\n' "$SCRIPT" | base64 -w0)"
    # Linux cuts the x86 command line at 2047 bytes.
    ((${#CMDLINE} < 2000)) || die "COMMAND is too long for the kernel command line (${#CMDLINE} bytes
with the base64 of COMMAND; keep COMMAND under ~1.2 KiB, or put a script in the guest)"
fi
case "$MODE" in
command) log "booting Debian and running: $SCRIPT" ;;
demo) log "no terminal and no COMMAND: booting Debian and running the demo" ;;
interactive)
    size="$(stty size 2>/dev/null || true)"
    [[ -z "$size" ]] || CMDLINE+=" ob_tty=${size/ /x}"
    log "booting Debian: root shell on this terminal ('exit' or Ctrl-D powers the VM off)"
    ;;
esac

# The live snapshot: when the guest says it writes, snapshot the running disk through the
# control socket, with the write counters before and after to show I/O went on around it.
written() { # bytes the guest has written to the disk so far (all queues)
    "$BIN/vhost-user-blk" ctl "$CTL" stats | grep -o '"write_bytes": *[0-9]*' | cut -d: -f2 |
        awk '{ s += $1 } END { printf "%d", s }'
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
live_snapshot() {
    local i start before after reply
    for ((i = 0; i < 1200; i++)); do
        grep -q '^OB_DEMO_WRITING' "$OUT/serial.log" 2>/dev/null && break
        grep -q '^OB_EXIT=' "$OUT/serial.log" 2>/dev/null && return 0
        sleep 0.1
    done
    # Snapshot once fio's writes are flowing (4 MiB seen), then watch them go on.
    start="$(written)"
    for ((i = 0; i < 100; i++)); do
        (($(written) - start >= 4 << 20)) && break
        sleep 0.1
    done
    before="$(written)"
    reply="$("$BIN/vhost-user-blk" ctl "$CTL" snapshot-create live-demo 2>&1)" || true
    for ((i = 0; i < 50; i++)); do
        after="$(written)"
        ((after - before >= 4 << 20)) && break
        sleep 0.1
    done
    log "host: vhost-user-blk ctl $CTL snapshot-create live-demo -> $reply"
    log "host: guest writes served: $(mib "$before") before the snapshot, $(mib "$after") after it"
}

: >"$OUT/serial.log"
if [[ "$MODE" == demo ]]; then
    live_snapshot &
    WATCH_PID=$!
fi
t=$SECONDS
set +e
"${NETNS[@]}" "${VM[@]}" --cmdline "$CMDLINE" | tee "$OUT/serial.log"
VMM_STATUS=${PIPESTATUS[0]}
set -e
BOOT_SECS=$((SECONDS - t))
if [[ -n "$WATCH_PID" ]]; then
    wait "$WATCH_PID" || true
    WATCH_PID=""
fi
# vhost-user-blk flushes and exits on SIGTERM; the overlay is checked after that.
kill -TERM "$BLK_PID" 2>/dev/null || true
wait "$BLK_PID" 2>/dev/null || true
BLK_PID=""
((VMM_STATUS == 0)) || die "outboard exited with status $VMM_STATUS (0 = guest powered off, 3 = reset or
kernel panic, 2 = triple fault, 1 = VMM error); serial output in $OUT/serial.log"
log "guest ran for $BOOT_SECS s and powered off"

# 8. the overlay afterwards
log "outboard-img snapshot -l $OVERLAY"
"$IMG" snapshot -l "$OVERLAY"
log "outboard-img check $OVERLAY"
"$IMG" check "$OVERLAY"
log "qemu-img check $OVERLAY (independent cross-check)"
qemu-img check "$OVERLAY"
if [[ "$MODE" == demo ]]; then
    # The host reads the guest's file back out of the backing chain (overlay + base).
    FLAT="$RUN/flat.raw"
    "$IMG" convert -q -f qcow2 -O raw "$OVERLAY" "$FLAT"
    host_copy="$(debugfs -R 'cat /root/outboard-demo.txt' "$FLAT" 2>/dev/null)"
    rm -f "$FLAT"
    guest_copy="$(sed -n 's/^guest: wrote \/root\/outboard-demo.txt: \(.*\)/\1/p' "$OUT/serial.log" | tr -d '\r')"
    [[ -n "$host_copy" && "$host_copy" == "$guest_copy" ]] ||
        die "the guest's /root/outboard-demo.txt is not in the overlay: host read '$host_copy', guest wrote '$guest_copy'"
    log "host: /root/outboard-demo.txt read from the overlay's backing chain (convert + debugfs): $host_copy"
fi
log "overlay: $(du -h "$OVERLAY" | cut -f1) on disk over the $(du -h "$BASE" | cut -f1) base; main job took $((SECONDS - T0)) s"

if [[ "$MODE" != interactive ]]; then
    GUEST_STATUS="$(sed -n 's/^OB_EXIT=\([0-9]*\).*/\1/p' "$OUT/serial.log" | tail -n1)"
    [[ -n "$GUEST_STATUS" ]] || die "the guest printed no OB_EXIT=<status> (see $OUT/serial.log)"
    log "guest command exited with status $GUEST_STATUS"
    exit "$GUEST_STATUS"
fi
