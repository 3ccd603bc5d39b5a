# shellcheck shell=bash
# Helpers shared by scripts/test.sh and scripts/main.sh. Source it; don't run it.

# System packages the build and the tests need (Debian names).
#   qemu-utils: qemu-img, the oracle the qcow2 tests check our images against
#   gcc, libc6-dev: zstd-sys compiles the bundled zstd C sources
#   qemu-system-x86: QEMU (TCG) booting the real-guest tests (tests/src/guest.rs); it also
#     brings qemu-storage-daemon (qemu-system-common), the reference vhost-user-blk backend
#   cpio: scripts/guest/build-guest.sh packs the test guest's initramfs with it
#   e2fsprogs: mke2fs for the PVM guest initramfs and debugfs in the VMM disk test
#   iproute2: `ip netns`/veth/bridge setup of the network tests (tests/src/netns.rs, VMM NIC)
#   dpdk-dev: dpdk-testpmd, the virtio-user frontend of tests/tests/net_dpdk.rs
# shellcheck disable=SC2034 # used by the scripts that source this file
OUTBOARD_APT_PACKAGES=(qemu-utils gcc libc6-dev qemu-system-x86 cpio e2fsprogs iproute2 dpdk-dev)

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# ensure_apt_packages PKG...: install the packages that are missing, and only those.
# Does nothing (no apt-get update either) when all are installed already.
ensure_apt_packages() {
    local missing=() p
    for p in "$@"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "system packages already installed: $*"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing system packages: ${missing[*]} (no apt-get here: install them by hand)"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 ||
            die "missing system packages: ${missing[*]} (not root and no sudo: install them by hand)"
        sudo=(sudo -n)
    fi
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

# require_cmd CMD HINT: fail with a clear message when CMD is not on PATH.
require_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}
