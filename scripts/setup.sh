#!/usr/bin/env bash
# Everything vhpc needs on a fresh Debian 12 machine: Debian packages, the static `vhpc`
# binary, the guest kernel (Debian's cloud kernel), the default guest initramfs and the
# default root file system image (Debian 12 + openmpi-bin, for `vhpc run --rootfs`).
# Idempotent: what is already there is kept. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 busybox-static cpio debootstrap e2fsprogs iproute2 util-linux)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# apt-get download (used by `vhpc image kernel`) needs current package lists.
if [ ${#missing[@]} -gt 0 ] || ! apt-cache depends linux-image-cloud-amd64 >/dev/null 2>&1; then
    echo "setup: apt-get update" >&2
    $sudo apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

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
