#!/usr/bin/env bash
# scripts/guest/build-guest.sh OUTDIR — build the Outboard test guest from Debian packages.
#
# Produces OUTDIR/vmlinuz (Debian's cloud kernel) and OUTDIR/initramfs.cpio.gz (busybox-static,
# fio with the libraries ldd lists, the virtio kernel modules and scripts/guest/init), plus
# OUTDIR/stamp describing what they were built from.
#
# Cached: when OUTDIR/stamp matches the package versions apt would download now (and this
# script and init are unchanged), nothing is done. Runs `apt-get update` itself when apt has
# no package lists. Concurrent runs on the same OUTDIR serialise on a lock file.
#
# Needs: apt-get, dpkg-deb, cpio, gzip, ldd, flock (Debian: cpio is the only non-essential one).
# Environment:
#   OB_GUEST_KERNEL_PKG  kernel package to use instead of the current bookworm cloud kernel
#                        (linux-image-*-cloud-amd64-unsigned)
#   OB_GUEST_FORCE=1     rebuild even if the stamp matches
#
# The guest's command line protocol (ob_script=BASE64, ob_wait=vda,net, markers OB_START /
# OB_EXIT=N) is described in scripts/guest/init and scripts/guest/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/../lib.sh
source "$HERE/../lib.sh"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" || $# -ne 1 ]]; then
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 1 ]] && exit 0
    exit 2
fi

OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# Kernel modules for virtio-pci, virtio-blk and virtio-net, in insmod order.
MODULES=(failover net_failover virtio virtio_ring virtio_pci_legacy_dev virtio_pci_modern_dev
    virtio_pci virtio_blk virtio_net)

for c in apt-get apt-cache dpkg-deb cpio gzip ldd flock find sha256sum; do
    require_cmd "$c" "install it (Debian: apt-get install cpio util-linux libc-bin dpkg apt)"
done

exec 9>"$OUT/.lock"
flock 9

# apt-get update when apt cannot resolve packages (fresh machine or container without lists).
apt_update() {
    log "build-guest: apt-get update"
    local sudo=()
    ((EUID == 0)) || sudo=(sudo -n)
    "${sudo[@]}" apt-get update -q >&2
}

# kernel_pkg: the unsigned image package of the current cloud kernel (what the
# linux-image-cloud-amd64 meta-package depends on), falling back to the newest one listed.
kernel_pkg() {
    if [[ -n "${OB_GUEST_KERNEL_PKG:-}" ]]; then
        echo "$OB_GUEST_KERNEL_PKG"
        return
    fi
    local signed p
    signed="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -n1)"
    if [[ -n "$signed" ]] && apt-cache show "$signed-unsigned" >/dev/null 2>&1; then
        echo "$signed-unsigned"
        return
    fi
    p="$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64-unsigned$' |
        awk '{print $1}' | sort -V | tail -n1)"
    [[ -n "$p" ]] && echo "$p"
}

# lib_closure: library packages fio needs (recursive Depends/Pre-Depends, libraries only).
lib_closure() {
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances fio 2>/dev/null |
        grep -E '^(lib[a-z0-9]|zlib1g)' | sort -u
}

# resolve: sets KPKG and PKGS, and prints the download URIs (the cache key).
resolve() {
    KPKG="$(kernel_pkg || true)"
    [[ -n "$KPKG" ]] || return 1
    mapfile -t LIBPKGS < <(lib_closure)
    ((${#LIBPKGS[@]} > 0)) || return 1
    PKGS=("$KPKG" busybox-static fio "${LIBPKGS[@]}")
    URIS="$(apt-get download --print-uris "${PKGS[@]}" 2>/dev/null)" || return 1
    [[ -n "$URIS" ]]
}

KPKG="" PKGS=() LIBPKGS=() URIS=""
if ! resolve; then
    if apt_update && resolve; then
        :
    elif [[ -f "$OUT/stamp" && -f "$OUT/vmlinuz" && -f "$OUT/initramfs.cpio.gz" ]]; then
        log "build-guest: cannot resolve packages (offline?); using the existing guest in $OUT"
        exit 0
    else
        die "build-guest: cannot resolve the guest packages with apt (kernel: '${KPKG:-?}')"
    fi
fi

# The cache key: the exact .deb file names (package_version_arch) and this script and init.
stamp() {
    printf 'kernel %s\n' "$KPKG"
    printf '%s\n' "$URIS" | awk '{print $2}' | sort
    sha256sum "$HERE/build-guest.sh" "$HERE/init" | awk '{print $1}'
}
STAMP="$(stamp)"
if [[ "${OB_GUEST_FORCE:-0}" != 1 && -f "$OUT/vmlinuz" && -f "$OUT/initramfs.cpio.gz" &&
    -f "$OUT/stamp" && "$(cat "$OUT/stamp")" == "$STAMP" ]]; then
    log "build-guest: $OUT is up to date ($KPKG)"
    exit 0
fi

log "build-guest: building the guest in $OUT from $KPKG, busybox-static, fio (+${#LIBPKGS[@]} library packages)"
WORK="$OUT/.work"
rm -rf "$WORK" "$OUT/stamp"
mkdir -p "$WORK/debs" "$WORK/kernel" "$WORK/bb" "$WORK/fio" "$WORK/sysroot" "$WORK/root"

# --- download and unpack ---------------------------------------------------------------
# apt-get download as root warns that _apt can't write the directory; that is harmless.
download() { (cd "$WORK/debs" && apt-get download -q "${PKGS[@]}" >"$WORK/download.log" 2>&1); }
if ! download; then
    # Stale package lists (versions gone from the mirror): refresh them and try once more.
    log "build-guest: apt-get download failed; refreshing the package lists and retrying"
    rm -f "$WORK/debs/"*.deb
    if ! { apt_update && resolve && download; }; then
        cat "$WORK/download.log" >&2
        die "build-guest: apt-get download failed"
    fi
    # resolve may have picked newer versions: the stamp must describe what was downloaded.
    STAMP="$(stamp)"
fi
deb() { find "$WORK/debs" -maxdepth 1 -name "${1}_*.deb" | head -n1; }
KDEB="$(deb "$KPKG")"
BBDEB="$(deb busybox-static)"
FIODEB="$(deb fio)"
[[ -n "$KDEB" && -n "$BBDEB" && -n "$FIODEB" ]] || die "build-guest: downloaded packages missing"
dpkg-deb -x "$KDEB" "$WORK/kernel"
dpkg-deb -x "$BBDEB" "$WORK/bb"
dpkg-deb -x "$FIODEB" "$WORK/fio"
for p in "${LIBPKGS[@]}"; do
    f="$(deb "$p")"
    [[ -n "$f" ]] && dpkg-deb -x "$f" "$WORK/sysroot"
done

R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib/modules,mnt}
ln -s lib "$R/lib64"

# --- kernel and modules ---------------------------------------------------------------------
VMLINUZ="$(find "$WORK/kernel/boot" -name 'vmlinuz-*' | head -n1)"
[[ -n "$VMLINUZ" ]] || die "build-guest: no vmlinuz in $KDEB"
KVER="${VMLINUZ##*/vmlinuz-}"
MODDIR="$WORK/kernel/lib/modules/$KVER"
: >"$R/etc/ob-modules"
# modules.builtin lists paths with '-' or '_' as in the source file name.
is_builtin() { grep -Eq "/${1}.ko\$|/${1//_/-}.ko\$" "$MODDIR/modules.builtin" 2>/dev/null; }
for m in "${MODULES[@]}"; do
    if is_builtin "$m"; then
        log "build-guest: module $m is built into $KVER"
        continue
    fi
    ko="$(find "$MODDIR/kernel" -regextype posix-extended \
        -regex ".*/(${m}|${m//_/-})\.ko(\.xz|\.zst|\.gz)?" | head -n1)"
    if [[ -z "$ko" ]]; then
        log "build-guest: module $m is neither built in nor shipped in $KVER: skipped"
        continue
    fi
    case "$ko" in
    *.xz) require_cmd xz "$ko is xz-compressed: apt-get install xz-utils" &&
        xz -dc "$ko" >"$R/lib/modules/$m.ko" ;;
    *.zst) require_cmd zstd "$ko is zstd-compressed: apt-get install zstd" &&
        zstd -qdc "$ko" >"$R/lib/modules/$m.ko" ;;
    *.gz) gzip -dc "$ko" >"$R/lib/modules/$m.ko" ;;
    *) cp "$ko" "$R/lib/modules/$m.ko" ;;
    esac
done
# Load order: the list above, each module after the modules its .modinfo `depends=` names
# (in 6.1, virtio needs virtio_ring, so the list order alone is not enough).
declare -A EMITTED=()
emit() {
    local m=$1 d
    [[ -n "${EMITTED[$m]:-}" || ! -f "$R/lib/modules/$m.ko" ]] && return 0
    EMITTED[$m]=1
    for d in $(tr '\0' '\n' <"$R/lib/modules/$m.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
        [[ -f "$R/lib/modules/$d.ko" ]] || is_builtin "$d" ||
            log "build-guest: $m depends on $d, which is neither built in nor in the guest"
        emit "$d"
    done
    echo "$m.ko" >>"$R/etc/ob-modules"
}
for m in "${MODULES[@]}"; do emit "$m"; done
log "build-guest: modules (load order): $(tr '\n' ' ' <"$R/etc/ob-modules")"

# --- busybox --------------------------------------------------------------------------------
cp "$WORK/bb/bin/busybox" "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list-full); do
    [[ -e "$R/$applet" || -L "$R/$applet" ]] || ln -s /bin/busybox "$R/$applet"
done

# --- fio and every library ldd lists (resolved in the unpacked Debian libraries) ------------
cp "$WORK/fio/usr/bin/fio" "$R/usr/bin/fio"
LIBPATH="$(find "$WORK/sysroot" \( -name '*.so' -o -name '*.so.*' \) -printf '%h\n' | sort -u | paste -sd:)"
LDD_OUT="$(LD_LIBRARY_PATH="$LIBPATH" ldd "$WORK/fio/usr/bin/fio")" || die "build-guest: ldd fio failed"
if grep -q 'not found' <<<"$LDD_OUT"; then
    die "build-guest: fio libraries not found:"$'\n'"$(grep 'not found' <<<"$LDD_OUT")"
fi
while read -r lib; do
    [[ "$lib" == "$WORK/sysroot/"* ]] || die "build-guest: ldd resolved $lib outside the Debian packages"
    rel="${lib#"$WORK/sysroot"}"
    mkdir -p "$R$(dirname "$rel")"
    cp -L "$lib" "$R$rel"
done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3}' <<<"$LDD_OUT")
# The dynamic loader (PT_INTERP /lib64/ld-linux-x86-64.so.2; /lib64 -> lib here).
LOADER="$WORK/sysroot/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[[ -f "$LOADER" ]] || die "build-guest: no dynamic loader in libc6"
mkdir -p "$R/lib/x86_64-linux-gnu"
cp -L "$LOADER" "$R/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -s x86_64-linux-gnu/ld-linux-x86-64.so.2 "$R/lib/ld-linux-x86-64.so.2"

# --- init and small files -------------------------------------------------------------------
cp "$HERE/init" "$R/init"
chmod 755 "$R/init"
echo 'root:x:0:0:root:/root:/bin/sh' >"$R/etc/passwd"
echo 'root:x:0:' >"$R/etc/group"
printf 'kernel=%s\n' "$KVER" >"$R/etc/ob-guest"

# --- pack -----------------------------------------------------------------------------------
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) |
    gzip -6 -n >"$OUT/initramfs.cpio.gz.tmp"
cp "$VMLINUZ" "$OUT/vmlinuz.tmp"
mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
printf '%s\n' "$STAMP" >"$OUT/stamp"
rm -rf "$WORK"
log "build-guest: done: $OUT/vmlinuz ($KVER), $OUT/initramfs.cpio.gz ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1))"
