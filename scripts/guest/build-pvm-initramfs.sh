#!/usr/bin/env bash
# scripts/guest/build-pvm-initramfs.sh OUTDIR — a small initramfs for the PVM guest kernel
# (../shared/guest/vmlinux, no modules needed) booted by the outboard VMM.
#
# Contents: Debian's static busybox (apt-get download busybox-static, unpacked with dpkg-deb,
# nothing installed), Debian's ethtool (downloaded the same way; for the multi-queue test's
# `ethtool -L`), the host's mke2fs (e2fsprogs, essential on Debian), the libraries ldd lists
# for both and the dynamic loader, and scripts/guest/init as /init (same ob_script protocol
# as the QEMU test guest: OB_START, the script's output, OB_EXIT=<status>, poweroff).
#
# Output: OUTDIR/pvm-initramfs.cpio.gz. Cached: rebuilt only when the busybox version, this
# script, init or mke2fs change (OUTDIR/pvm-initramfs.stamp). OB_GUEST_FORCE=1 rebuilds.
#
# OB_PVM_FIO=1 adds fio (for benchmarks): it is taken, with its libraries, from the Debian
# test guest's initramfs (scripts/guest/build-guest.sh OUTDIR, run when missing) and the
# output is OUTDIR/pvm-initramfs-fio.cpio.gz instead.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
source "$HERE/../lib.sh"

OUT="${1:-}"
[[ -n "$OUT" ]] || die "usage: $0 OUTDIR"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for c in apt-get dpkg-deb cpio gzip ldd flock; do require_cmd "$c" "needed to build the PVM initramfs"; done
MKE2FS="$(command -v mke2fs || true)"
[[ -n "$MKE2FS" ]] || die "mke2fs not found: apt-get install e2fsprogs"

NAME=pvm-initramfs
FIO_SRC=""
if [[ "${OB_PVM_FIO:-0}" == 1 ]]; then
    NAME=pvm-initramfs-fio
    bash "$HERE/build-guest.sh" "$OUT"
    FIO_SRC="$OUT/initramfs.cpio.gz"
fi

exec 9>"$OUT/.pvm-initramfs.lock"
flock 9

BBVER="$(apt-cache policy busybox-static 2>/dev/null | sed -n 's/^ *Candidate: //p')"
if [[ -z "$BBVER" || "$BBVER" == "(none)" ]]; then
    log "build-pvm-initramfs: no package lists; running apt-get update"
    apt-get update -q >/dev/null
    BBVER="$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: //p')"
fi
ETVER="$(apt-cache policy ethtool | sed -n 's/^ *Candidate: //p')"
[[ -n "$ETVER" && "$ETVER" != "(none)" ]] || die "build-pvm-initramfs: no ethtool package candidate"
STAMP="busybox-static=$BBVER ethtool=$ETVER $(sha256sum "$0" "$HERE/init" "$MKE2FS" ${FIO_SRC:+"$FIO_SRC"} | awk '{print $1}' | paste -sd' ')"
if [[ "${OB_GUEST_FORCE:-0}" != 1 && -f "$OUT/$NAME.cpio.gz" && -f "$OUT/$NAME.stamp" &&
    "$(cat "$OUT/$NAME.stamp")" == "$STAMP" ]]; then
    log "build-pvm-initramfs: $OUT/$NAME.cpio.gz is up to date"
    exit 0
fi

WORK="$OUT/.pvm-work"
rm -rf "$WORK"
mkdir -p "$WORK/debs" "$WORK/bb" "$WORK/root"
(cd "$WORK/debs" && apt-get download -q "busybox-static=$BBVER" "ethtool=$ETVER" >"$WORK/download.log" 2>&1) || {
    cat "$WORK/download.log" >&2
    die "build-pvm-initramfs: apt-get download busybox-static ethtool failed"
}
dpkg-deb -x "$(find "$WORK/debs" -name 'busybox-static_*.deb' | head -n1)" "$WORK/bb"
mkdir -p "$WORK/et"
dpkg-deb -x "$(find "$WORK/debs" -name 'ethtool_*.deb' | head -n1)" "$WORK/et"

R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,mnt,lib/x86_64-linux-gnu}
ln -s lib "$R/lib64"
cp "$WORK/bb/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list-full); do
    [[ -e "$R/$applet" || -L "$R/$applet" ]] || ln -s /bin/busybox "$R/$applet"
done

# mke2fs (real ext4 with extents/journal; busybox only makes ext2) and its libraries.
for d in bin sbin usr/bin usr/sbin; do
    rm -f "$R/$d/mke2fs" "$R/$d/mkfs.ext2" "$R/$d/mkfs.ext4"
done
cp -L "$MKE2FS" "$R/usr/sbin/mke2fs"
ln -s mke2fs "$R/usr/sbin/mkfs.ext4"
while read -r lib; do
    cp -L "$lib" "$R/lib/x86_64-linux-gnu/"
done < <(ldd "$MKE2FS" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
# ethtool (busybox has none) and its libraries (libmnl: the host has it with iproute2).
cp "$WORK/et/sbin/ethtool" "$R/usr/sbin/ethtool"
while read -r lib; do
    cp -L "$lib" "$R/lib/x86_64-linux-gnu/"
done < <(ldd "$R/usr/sbin/ethtool" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
ldd "$R/usr/sbin/ethtool" | grep -q "not found" && die "build-pvm-initramfs: ethtool needs a library the host lacks"
cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -s x86_64-linux-gnu/ld-linux-x86-64.so.2 "$R/lib/ld-linux-x86-64.so.2"
# mke2fs reads /etc/mke2fs.conf when present; its built-in defaults are fine without.
# Call it as /usr/sbin/mke2fs: busybox sh runs its own applets first (FEATURE_SH_STANDALONE).

if [[ -n "$FIO_SRC" ]]; then
    # fio and the libraries build-guest.sh resolved for it (no kernel modules: the PVM kernel has none).
    (cd "$R" && zcat "$FIO_SRC" | cpio -idmu --quiet 'usr/bin/fio' 'lib/x86_64-linux-gnu/*' 'usr/lib/*')
    [[ -x "$R/usr/bin/fio" ]] || die "build-pvm-initramfs: no usr/bin/fio in $FIO_SRC"
fi

cp "$HERE/init" "$R/init"
chmod 755 "$R/init"
echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"
: >"$R/etc/mtab"

(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
    gzip -6 -n >"$OUT/$NAME.cpio.gz.tmp"
mv "$OUT/$NAME.cpio.gz.tmp" "$OUT/$NAME.cpio.gz"
printf '%s\n' "$STAMP" >"$OUT/$NAME.stamp"
rm -rf "$WORK"
log "build-pvm-initramfs: done: $OUT/$NAME.cpio.gz ($(du -h "$OUT/$NAME.cpio.gz" | cut -f1))"
