# shellcheck shell=bash
# Helpers shared by scripts/test.sh and scripts/main.sh. Source it; don't run it.

# System packages the build, the tests and the main job need (Debian names).
#   qemu-utils: qemu-img and qemu-io, the oracle the qcow2 tests check our images against
#   qemu-system-x86: QEMU (TCG) booting the real-guest tests (tests/src/guest.rs); it also
#     brings qemu-storage-daemon (qemu-system-common), the reference vhost-user-blk backend.
#     Its qemu-system-common breaks a qemu-utils of another release: both are installed in
#     one transaction at the same version (see ensure_apt_packages).
#   gcc, libc6-dev: zstd-sys compiles the bundled zstd C sources
#   cpio: scripts/guest/*.sh pack the test guests' initramfs with it
#   e2fsprogs: mke2fs for the PVM guest initramfs and debugfs in the VMM disk test
#   iproute2: `ip netns`/veth/bridge setup of the network tests (tests/src/netns.rs, VMM NIC)
#   dpdk-dev: dpdk-testpmd, the virtio-user frontend of tests/tests/net_dpdk.rs
#   debootstrap, debian-archive-keyring, wget: scripts/guest/build-debian.sh makes the main
#     job's Debian 12 base image (debootstrap --variant=minbase, signatures checked against
#     the keyring; wget probes the mirror first, for a clear message when it is unreachable)
#   prometheus: promtool validates the daemons' --metrics text (tests/tests/metrics.rs)
# shellcheck disable=SC2034 # used by the scripts that source this file
OUTBOARD_APT_PACKAGES=(qemu-utils gcc libc6-dev qemu-system-x86 cpio e2fsprogs iproute2 dpdk-dev
    debootstrap debian-archive-keyring wget prometheus systemd)

# Commands the tests and the main job run, each as "COMMAND|PACKAGE|ARGS": checked by
# running `COMMAND ARGS` (exit 0 required) after the install step, so a package that is
# listed as installed but lost its program (or a program that cannot start) is caught here
# with the package's name, not by 60 failing tests.
# shellcheck disable=SC2034 # used by the scripts that source this file
OUTBOARD_COMMANDS=(
    "qemu-img|qemu-utils|--version"
    "qemu-io|qemu-utils|--version"
    "qemu-system-x86_64|qemu-system-x86|--version"
    "qemu-storage-daemon|qemu-system-common (qemu-system-x86)|--version"
    "dpdk-testpmd|dpdk (dpdk-dev)|-h"
    "mke2fs|e2fsprogs|-V"
    "debugfs|e2fsprogs|-V"
    "cpio|cpio|--version"
    "ip|iproute2|-V"
    "gcc|gcc|--version"
    "gzip|gzip|--version"
    "sha256sum|coreutils|--version"
    "flock|util-linux|--version"
    "mount|mount|--version"
    "umount|mount|--version"
    "dpkg-deb|dpkg|--version"
    "apt-get|apt|--version"
    "ldd|libc-bin|--version"
    "debootstrap|debootstrap|--version"
    "wget|wget|--version"
    "findmnt|util-linux|--version"
    "setpriv|util-linux|--version"
    "unshare|util-linux|--version"
    "truncate|coreutils|--version"
    "promtool|prometheus|--version"
    "systemd-analyze|systemd|--version"
)

log() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# pkg_version PKG: the installed version of PKG, or nothing.
pkg_version() {
    local st
    st="$(dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true)"
    [[ "$st" == "install ok installed "* ]] && printf '%s' "${st##* }"
    return 0
}

# candidate_version PKG: the version apt would install for PKG, or nothing.
candidate_version() {
    apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | grep -v '(none)' || true
}

# ensure_apt_packages PKG...: installs what is missing in ONE apt transaction, and makes
# sure that transaction removes nothing.
#
# QEMU: qemu-system-x86 and qemu-utils must come from the same release (a new machine has
# qemu-utils 10.0.2 from a backport; Debian 12's qemu-system-x86 7.2 breaks it, and a plain
# `apt-get install qemu-system-x86` silently REMOVES qemu-utils). When the two differ, both
# are installed at qemu-system-x86's version in the same transaction (a downgrade of
# qemu-utils if need be). The transaction is simulated first; if apt would remove any
# package, nothing is installed and the script stops, naming it.
ensure_apt_packages() {
    local want=() p
    for p in "$@"; do
        [[ -n "$(pkg_version "$p")" ]] || want+=("$p")
    done
    local qsys qutils need_update=0
    qsys="$(pkg_version qemu-system-x86)"
    qutils="$(pkg_version qemu-utils)"
    if [[ " $* " == *" qemu-system-x86 "* && ( -z "$qsys" || "$qsys" != "$qutils" ) ]]; then
        need_update=1
    fi
    if ((${#want[@]} == 0 && need_update == 0)); then
        log "system packages already installed: $*"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 ||
        die "missing system packages: ${want[*]} (no apt-get here: install them by hand)"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null 2>&1 ||
            die "missing system packages: ${want[*]} (not root and no sudo: install them by hand)"
        sudo=(sudo -n)
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    "${sudo[@]}" apt-get update -q >&2
    local args=()
    for p in "$@"; do
        case "$p" in
        qemu-system-x86 | qemu-utils) ;;
        *) [[ -n "$(pkg_version "$p")" ]] || args+=("$p") ;;
        esac
    done
    if [[ " $* " == *" qemu-system-x86 "* ]]; then
        local v
        v="${qsys:-$(candidate_version qemu-system-x86)}"
        [[ -n "$v" ]] || die "apt has no qemu-system-x86 package (check /etc/apt/sources.list)"
        # Same version for QEMU's system emulator and its tools.
        args+=("qemu-system-x86=$v" "qemu-utils=$v")
        if [[ -n "$qutils" && "$qutils" != "$v" ]]; then
            log "qemu-utils $qutils does not match qemu-system-x86 $v: installing qemu-utils $v with it"
        fi
    fi
    local apt=(apt-get install -y -q --no-install-recommends --allow-downgrades)
    local sim removals
    sim="$("${sudo[@]}" "${apt[@]}" -s "${args[@]}" </dev/null 2>&1)" ||
        die "apt cannot install ${args[*]}:
$sim"
    removals="$(printf '%s\n' "$sim" | sed -n 's/^Remv \([^ ]*\).*/\1/p' | tr '\n' ' ')"
    [[ -z "$removals" ]] ||
        die "installing ${args[*]} would REMOVE: $removals; refusing (install a matching set by hand)"
    log "installing system packages in one transaction: ${args[*]}"
    "${sudo[@]}" "${apt[@]}" "${args[@]}" </dev/null
}

# check_commands "CMD|PKG|ARGS"...: runs each command (stdout/stderr discarded) and stops
# with every missing or broken one and the package that provides it.
check_commands() {
    local spec cmd pkg args bad=()
    for spec in "$@"; do
        IFS='|' read -r cmd pkg args <<<"$spec"
        if ! command -v "$cmd" >/dev/null 2>&1; then
            bad+=("'$cmd' not found (package $pkg)")
        else
            # shellcheck disable=SC2086 # ARGS is a word list
            "$cmd" $args </dev/null >/dev/null 2>&1 || bad+=("'$cmd $args' failed (package $pkg)")
        fi
    done
    if ((${#bad[@]})); then
        printf 'error: %s\n' "${bad[@]}" >&2
        die "${#bad[@]} required command(s) missing or broken (see above)"
    fi
    log "required commands run: ${#@} checked"
}

# require_cmd CMD HINT: fail with a clear message when CMD is not on PATH.
require_cmd() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"
}
