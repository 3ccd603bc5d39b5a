#!/usr/bin/env bash
# scripts/bench-vmm.sh [SECONDS] — fio in the guest behind the outboard VMM and behind QEMU,
# both on the same vhost-user-blk socket (our daemon, one queue, a raw 1 GiB image), same
# kernel, same initramfs, 2 vCPUs, 1 GiB RAM. Prints IOPS side by side. Not part of CI.
#
# Jobs (4 KiB, O_DIRECT, libaio): randread and randwrite at queue depth 1 and 32, SECONDS
# each (default 10). QEMU runs q35 + vhost-user-blk-pci with -enable-kvm on PVM hosts (the
# PVM kernel), which is what the outboard VMM is compared with.
# Environment: OUTBOARD_KERNEL (default ../shared/guest/vmlinux), BENCH_IMAGE (default
# /var/tmp/outboard-bench.raw), OUTBOARD_QEMU (default qemu-system-x86_64).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
SECS="${1:-10}"
[[ "$SECS" =~ ^[0-9]+$ ]] || die "SECONDS must be a number"
[[ -e /dev/kvm ]] || die "/dev/kvm is missing"
[[ -d /sys/module/kvm_pvm ]] || die "this benchmark boots the PVM guest kernel: PVM host only"
KERNEL="${OUTBOARD_KERNEL:-$ROOT/../shared/guest/vmlinux}"
[[ -f "$KERNEL" ]] || die "guest kernel $KERNEL not found (set OUTBOARD_KERNEL)"
QEMU="${OUTBOARD_QEMU:-qemu-system-x86_64}"

log "building (release)"
cargo build --release -p vmm -p vhost-user-blk
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
OB_PVM_FIO=1 bash scripts/guest/build-pvm-initramfs.sh "$TARGET_DIR/guest"
INITRD="$TARGET_DIR/guest/pvm-initramfs-fio.cpio.gz"

IMAGE="${BENCH_IMAGE:-/var/tmp/outboard-bench.raw}"
if [[ ! -f "$IMAGE" || "$(stat -c %s "$IMAGE")" != $((1 << 30)) ]]; then
    log "writing $IMAGE (1 GiB, so reads hit allocated data)"
    dd if=/dev/urandom of="$IMAGE" bs=1M count=1024 status=none
fi
WORK="$(mktemp -d)"
SOCK="$WORK/blk.sock"
"$BIN/vhost-user-blk" --socket-path "$SOCK" --blk-file "$IMAGE" --num-queues 1 2>"$WORK/daemon.log" &
DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; wait $DAEMON 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do [[ -S "$SOCK" ]] && break; sleep 0.05; done
[[ -S "$SOCK" ]] || die "vhost-user-blk did not start: $(cat "$WORK/daemon.log")"

SCRIPT="for j in randread:1 randread:32 randwrite:1 randwrite:32; do rw=\${j%:*}; qd=\${j#*:}
fio --name=b --filename=/dev/vda --direct=1 --ioengine=libaio --bs=4k --rw=\$rw --iodepth=\$qd \
--runtime=$SECS --time_based --size=1g --minimal | awk -F';' -v n=\$rw-qd\$qd '{print \"RESULT\", n, (\$8 > 0 ? \$8 : \$49)}'
done"
CMDLINE="console=ttyS0 panic=-1 quiet 8250.nr_uarts=1 ob_wait=vda ob_script=$(printf '%s\n' "$SCRIPT" | base64 -w0)"

log "outboard: fio in the guest (4 jobs x ${SECS}s)"
"$BIN/outboard" --kernel "$KERNEL" --initramfs "$INITRD" --cpus 2 --memory 1G \
    --disk "socket=$SOCK" --cmdline "$CMDLINE" </dev/null >"$WORK/outboard.log" 2>&1 ||
    die "outboard failed: $(tail -20 "$WORK/outboard.log")"
log "QEMU (q35, -enable-kvm, vhost-user-blk-pci): same guest, same socket"
"$QEMU" -M q35 -enable-kvm -cpu host,-arch-capabilities -m 1G -smp 2 -nographic -no-reboot -nic none \
    -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
    -kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" \
    -chardev "socket,id=c0,path=$SOCK" -device vhost-user-blk-pci,chardev=c0,num-queues=1 \
    </dev/null >"$WORK/qemu.log" 2>&1 || die "QEMU failed: $(tail -20 "$WORK/qemu.log")"

printf '\n%-14s %12s %12s %8s\n' job outboard qemu ratio
for job in randread-qd1 randread-qd32 randwrite-qd1 randwrite-qd32; do
    a="$(awk -v j="$job" '$1 == "RESULT" && $2 == j {print $3}' "$WORK/outboard.log" | tr -d '\r')"
    b="$(awk -v j="$job" '$1 == "RESULT" && $2 == j {print $3}' "$WORK/qemu.log" | tr -d '\r')"
    r="$(awk -v a="${a:-0}" -v b="${b:-0}" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')"
    printf '%-14s %12s %12s %8s\n' "$job" "${a:--}" "${b:--}" "$r"
done
