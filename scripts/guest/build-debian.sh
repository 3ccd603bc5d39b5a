#!/usr/bin/env bash
# scripts/guest/build-debian.sh [--rebuild] --img OUTBOARD_IMG OUTDIR — the Debian 12 base image
# of scripts/main.sh.
#
#   1. debootstrap --variant=minbase bookworm (plus the packages in PACKAGES below) into
#      OUTDIR/rootfs, from the machine's own Debian mirror: the first bookworm URI of
#      /etc/apt/sources.list and /etc/apt/sources.list.d/* ($OUTBOARD_DEBIAN_MIRROR overrides),
#   2. installs scripts/guest/outboard-init as /sbin/outboard-init (the guest's PID 1: the PVM
#      guest kernel has no cgroups, so no systemd) and a hostname, fstab and motd,
#   3. mke2fs -t ext4 -d ROOTFS into a 4 GiB sparse raw file,
#   4. outboard-img convert -O qcow2 to OUTDIR/debian-base.qcow2 (read-only afterwards: it is
#      the backing file of every run's overlay).
#
# Cached: OUTDIR/debian-base.stamp holds the hashes of this script and outboard-init and the
# package set; when it matches, nothing is done. The debootstrap tree (OUTDIR/rootfs) is kept
# and reused while the suite and package set stay the same. --rebuild (or
# OUTBOARD_DEBIAN_REBUILD=1) rebuilds both. Concurrent runs serialise on OUTDIR/.lock.
# Needs root (debootstrap) and, the first time, the mirror: ~150 packages, 2-3 minutes here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/lib.sh
source "$HERE/../lib.sh"

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "$1"
}
REBUILD="${OUTBOARD_DEBIAN_REBUILD:-0}"
IMG=""
OUT=""
while (($#)); do
    case "$1" in
    --rebuild) REBUILD=1 ;;
    --img)
        IMG="${2:-}"
        shift
        ;;
    -h | --help) usage 0 ;;
    -*) usage 2 ;;
    *) OUT="$1" ;;
    esac
    shift
done
[[ -n "$OUT" && -n "$IMG" ]] || usage 2
[[ -x "$IMG" ]] || die "build-debian: $IMG is not an executable outboard-img"

SUITE=bookworm
# What the guest needs beyond minbase: the NIC (iproute2, ping), the demo's I/O (fio), ps/top
# (procps), mkfs/fsck (e2fsprogs), poweroff -f for outboard-init (busybox).
PACKAGES=(iproute2 iputils-ping procps fio e2fsprogs busybox less)
SIZE=4G
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
BASE="$OUT/debian-base.qcow2"
STAMP="$SUITE minbase ${PACKAGES[*]} $SIZE $(sha256sum "$0" "$HERE/outboard-init" | awk '{print $1}' | paste -sd' ')"

exec 9>"$OUT/.lock"
flock 9

if [[ "$REBUILD" != 1 && -f "$BASE" && -f "$OUT/debian-base.stamp" &&
    "$(cat "$OUT/debian-base.stamp")" == "$STAMP" ]]; then
    log "build-debian: $BASE is up to date (--rebuild or OUTBOARD_DEBIAN_REBUILD=1 rebuilds it)"
    exit 0
fi

((EUID == 0)) || die "build-debian: debootstrap needs root (run scripts/main.sh as root)"
require_cmd debootstrap "apt-get install debootstrap (scripts/main.sh installs it)"
require_cmd mke2fs "apt-get install e2fsprogs"
[[ -f "$KEYRING" ]] || die "build-debian: $KEYRING missing: apt-get install debian-archive-keyring"

# debian_mirror: the first URI serving $SUITE in apt's sources (deb822 .sources or one-line).
debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; suites = ""; types = ""; on = 1
                for (i = 1; i <= NF; i++) {
                    l = $i
                    if (l ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", l); uris = l }
                    else if (l ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", l); suites = " " l " " }
                    else if (l ~ /^Types:/) { types = l " " }
                    else if (l ~ /^Enabled:[ \t]*no/) { on = 0 }
                }
                if (on && types ~ /[ :]deb / && index(suites, " " suite " ")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        sed -n "s/^deb[ \t]\+\(\[[^]]*\][ \t]\+\)\{0,1\}\([^ \t]*\)[ \t]\+${SUITE}[ \t].*/\2/p" "$f"
    done
}
MIRROR="${OUTBOARD_DEBIAN_MIRROR:-$(debian_mirror | head -n1)}"
MIRROR="${MIRROR%/}"
[[ -n "$MIRROR" ]] ||
    die "build-debian: no Debian $SUITE mirror in /etc/apt/sources.list{,.d/*}: add one, or set OUTBOARD_DEBIAN_MIRROR=URL"

unreachable() {
    die "build-debian: the package registry $MIRROR could not be reached ($1).
The first run downloads Debian 12 ($SUITE: a ~400 MB root file system) from the machine's Debian
mirror (apt's sources). Check the network (and http_proxy/https_proxy), or set
OUTBOARD_DEBIAN_MIRROR to a reachable mirror. Later runs use the cached base image
$BASE and need no network."
}
# The debootstrap tree is kept (OUT/rootfs, ~400 MB) and reused while the suite and the
# package set stay the same, so a change of outboard-init costs no download.
ROOTFS="$OUT/rootfs"
ROOTFS_STAMP="$SUITE minbase ${PACKAGES[*]}"
RAW="$OUT/.root.ext4"
umount_under() { # debootstrap mounts /proc and /sys inside the chroot; never rm through a mount
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$1/" | sort -r); do
        umount -l "$m" || true
    done
}
trap 'rm -f "$RAW" "$BASE.tmp"; umount_under "$ROOTFS"' EXIT

t0=$SECONDS
if [[ "$REBUILD" != 1 && -f "$OUT/rootfs.stamp" && "$(cat "$OUT/rootfs.stamp")" == "$ROOTFS_STAMP" ]]; then
    log "build-debian: reusing the debootstrap tree $ROOTFS"
else
    log "build-debian: Debian $SUITE minbase + ${PACKAGES[*]} from $MIRROR"
    # A quick probe first, so a machine without network gets a clear message in seconds.
    probe_log="$(wget -q -T 20 -t 2 -O /dev/null "$MIRROR/dists/$SUITE/Release" 2>&1)" ||
        unreachable "GET $MIRROR/dists/$SUITE/Release failed${probe_log:+: $probe_log}"
    umount_under "$ROOTFS"
    rm -rf "$ROOTFS" "$OUT/rootfs.stamp"
    log "build-debian: debootstrap (log: $OUT/debootstrap.log)"
    inc="$(IFS=,; echo "${PACKAGES[*]}")"
    if ! debootstrap --variant=minbase --include="$inc" --keyring="$KEYRING" \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$OUT/debootstrap.log" 2>&1; then
        tail -n 15 "$OUT/debootstrap.log" >&2
        if grep -qiE "Failed getting release|Couldn't download|Temporary failure in name resolution|unable to resolve|Connection (refused|timed out)|Network is unreachable|No route to host" "$OUT/debootstrap.log"; then
            unreachable "debootstrap could not download from it"
        fi
        die "build-debian: debootstrap failed (see $OUT/debootstrap.log)"
    fi
    # No downloaded packages or lists in the image (apt update fetches lists when needed).
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/log/*.log
    printf '%s\n' "$ROOTFS_STAMP" >"$OUT/rootfs.stamp"
    log "build-debian: debootstrap took $((SECONDS - t0)) s ($(du -sh "$ROOTFS" | cut -f1))"
fi

install -m 755 "$HERE/outboard-init" "$ROOTFS/sbin/outboard-init"
echo outboard >"$ROOTFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\toutboard\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOTFS/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$ROOTFS/etc/fstab"
: >"$ROOTFS/etc/motd"
printf 'built %s by scripts/guest/build-debian.sh: %s\n' "$(date -u +%FT%TZ)" "$STAMP" >"$ROOTFS/etc/outboard-release"

t1=$SECONDS
rm -f "$RAW"
truncate -s "$SIZE" "$RAW"
mke2fs -q -F -t ext4 -L outboard-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$ROOTFS" "$RAW" ||
    die "build-debian: mke2fs -d failed"
"$IMG" convert -q -f raw -O qcow2 "$RAW" "$BASE.tmp" || die "build-debian: outboard-img convert failed"
chmod 444 "$BASE.tmp"
mv -f "$BASE.tmp" "$BASE"
printf '%s\n' "$STAMP" >"$OUT/debian-base.stamp"
log "build-debian: $BASE done ($(du -h "$BASE" | cut -f1) on disk, ext4 + qcow2 in $((SECONDS - t1)) s, $((SECONDS - t0)) s in all)"
