#!/usr/bin/env bash
# Everything vhpc needs on a fresh Debian 12 machine: Debian packages, the static `vhpc`
# binary, the guest kernel (Debian's cloud kernel), the default guest initramfs and the
# default root file system image (Debian 12 + openmpi-bin, for `vhpc run --rootfs`).
# Idempotent: what is already there is kept. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(busybox-static cpio debootstrap e2fsprogs iproute2 util-linux)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# The lab's emulator: QEMU 10 from bookworm-backports, not Debian 12's QEMU 7.2, whose
# emulation of nested SVM killed the emulated host in about one of three network-heavy lab
# runs (README, "The lab"). The QEMU packages in the lab host come from this install too.
# (Elsewhere than Debian 12, the distribution's own QEMU is taken as it is.)
bookworm=0
grep -q '^VERSION_CODENAME=bookworm' /etc/os-release && bookworm=1
qemu_wanted() {
    if [ $bookworm = 1 ]; then
        dpkg -s qemu-system-x86 2>/dev/null | grep -q '^Version: 1:10\.'
    else
        dpkg -s qemu-system-x86 >/dev/null 2>&1
    fi
}
backports=/etc/apt/sources.list.d/vhpc-bookworm-backports.list
new_source=0
if ! qemu_wanted && [ $bookworm = 1 ] \
    && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup: adding bookworm-backports (for QEMU 10) as $backports" >&2
    echo 'deb http://deb.debian.org/debian bookworm-backports main' | $sudo tee "$backports" >/dev/null
    new_source=1
fi
# apt-get download (used by `vhpc image kernel`) needs current package lists.
if [ ${#missing[@]} -gt 0 ] || [ $new_source = 1 ] || ! qemu_wanted \
    || ! apt-cache depends linux-image-cloud-amd64 >/dev/null 2>&1; then
    echo "setup: apt-get update" >&2
    $sudo apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! qemu_wanted; then
    target=()
    [ $bookworm = 1 ] && target=(-t bookworm-backports)
    echo "setup: installing qemu-system-x86 ${target[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${target[@]}" qemu-system-x86 >/dev/null
fi
qemu_wanted || {
    echo "setup: error: qemu-system-x86 10 from bookworm-backports is not installed; try: sudo apt-get install -t bookworm-backports qemu-system-x86" >&2
    exit 1
}

echo "setup: building vhpc (release, static)" >&2
cargo build --release --locked -p vhpc
ln -sf x86_64-unknown-linux-gnu/release/vhpc target/vhpc

target/vhpc image kernel >/dev/null
target/vhpc image initramfs >/dev/null
# Cached under a name that is the hash of its package set: built once (1-3 min: debootstrap
# downloads ~130 packages), then kept. Needs root (debootstrap chroots): through sudo, into
# this user's cache, owned by this user.
if [ -z "$sudo" ]; then
    target/vhpc image rootfs >/dev/null
else
    cache="${VHPC_CACHE_DIR:-}"
    [ -n "$cache" ] || cache="${XDG_CACHE_HOME:+$XDG_CACHE_HOME/vhpc}"
    [ -n "$cache" ] || cache="$HOME/.cache/vhpc"
    image=$($sudo env VHPC_CACHE_DIR="$cache" target/vhpc image rootfs)
    $sudo chown "$(id -u):$(id -g)" "$image"
fi
echo "setup: done; the binary is target/vhpc" >&2
