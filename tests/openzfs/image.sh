#!/bin/bash
# image.sh - make sure the OpenZFS VM image exists; print its folder on stdout
# (the only thing printed on stdout; progress and timing go to stderr).
#
# The cache key is the sha256 of build-image.sh and the files it uses
# (guest-init.sh, initrd-init.sh) plus ZFSMGR_VM_EXTRA_PKGS. An image is reused
# from ${ZFSMGR_VM_CACHE:-/var/cache/zfsmgr/openzfs-vm}/<key>/ when its COMPLETE
# marker (written last) is there; otherwise it is built in a temporary folder
# inside the cache and renamed into place, under a lock, so concurrent runs
# build it once and never see a half-built image.
#
# Usage: image.sh            ensure the image, print its folder
#        image.sh --key      print the cache key only
# Env:   ZFSMGR_VM_IMAGE=DIR      use this prebuilt image folder as is (no cache)
#        ZFSMGR_VM_CACHE=DIR      cache root (default /var/cache/zfsmgr/openzfs-vm)
#        ZFSMGR_VM_CACHE_PRUNE=1  after a build, delete the images of other keys
#        ZFSMGR_VM_EXTRA_PKGS     extra Debian packages for the image
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
FILES=(build-image.sh guest-init.sh initrd-init.sh)   # everything the build reads
IMAGE_FILES=(vmlinuz initrd.img root.img image.env)
say() { echo "image.sh: $*" >&2; }

cache_key() {  # cache_key DIR: key of the build files in DIR
    {
        echo "zfsmgr-openzfs-vm-image v1"
        echo "extra-pkgs: ${ZFSMGR_VM_EXTRA_PKGS:-}"
        local f
        for f in "${FILES[@]}"; do echo "== $f"; cat "$1/$f"; done
    } | sha256sum | cut -c1-64
}

complete() {  # complete DIR: the image in DIR can be used
    local f
    [ -f "$1/COMPLETE" ] || return 1
    for f in "${IMAGE_FILES[@]}"; do [ -s "$1/$f" ] || return 1; done
}

# remove a folder that may hold a half-built rootfs: unmount leftovers of a
# killed build first and never cross into another filesystem (/dev, /proc...)
remove_tree() {
    local d=$1 m
    [ -e "$d" ] || return 0
    d=$(realpath "$d")
    for m in $(awk -v p="$d/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$d"
}

KEY=$(cache_key "$HERE")
if [ "${1:-}" = --key ]; then echo "$KEY"; exit 0; fi

if [ -n "${ZFSMGR_VM_IMAGE:-}" ]; then
    for f in vmlinuz initrd.img root.img; do
        [ -s "$ZFSMGR_VM_IMAGE/$f" ] || { say "ZFSMGR_VM_IMAGE=$ZFSMGR_VM_IMAGE has no $f"; exit 1; }
    done
    say "using ZFSMGR_VM_IMAGE=$ZFSMGR_VM_IMAGE (not the cache)"
    echo "$ZFSMGR_VM_IMAGE"; exit 0
fi

CACHE=${ZFSMGR_VM_CACHE:-/var/cache/zfsmgr/openzfs-vm}
DIR=$CACHE/$KEY
T0=$(date +%s)
if complete "$DIR"; then
    say "reusing cached image $DIR ($(grep '^ZFS_VERSION=' "$DIR/image.env" | cut -d= -f2))"
    echo "$DIR"; exit 0
fi

[ "$(id -u)" = 0 ] || { say "building the image needs root"; exit 1; }
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
say "waiting for the cache lock $CACHE/.lock"
flock 9
if complete "$DIR"; then   # built by another run while we waited
    say "image built by a concurrent run: $DIR (waited $(( $(date +%s) - T0 ))s)"
    echo "$DIR"; exit 0
fi
# we hold the lock: any build folder left over is from a killed run
for d in "$CACHE"/.build-*; do [ -e "$d" ] && { say "removing stale $d"; remove_tree "$d"; }; done
[ -e "$DIR" ] && { say "removing incomplete $DIR"; remove_tree "$DIR"; }

TMP=$CACHE/.build-$KEY-$$
trap 'remove_tree "$TMP"' EXIT
# build from a copy of the files the key was computed from (a checkout edited
# during the build must not produce an image filed under the wrong key)
mkdir -p "$TMP/src"
for f in "${FILES[@]}"; do cp "$HERE/$f" "$TMP/src/$f"; done
[ "$(cache_key "$TMP/src")" = "$KEY" ] || { say "build files changed while starting; run again"; exit 1; }
say "no image for key $KEY: building into $TMP (6-10 min)"
bash "$TMP/src/build-image.sh" "$TMP" >&2 || { say "build-image.sh failed (log: see above)"; exit 1; }
rm -rf --one-file-system "$TMP/rootfs"
for f in "${IMAGE_FILES[@]}"; do [ -s "$TMP/$f" ] || { say "build produced no $f"; exit 1; }; done
echo "$KEY" > "$TMP/KEY"
sync -f "$TMP/root.img" 2>/dev/null || sync
date -u +%FT%TZ > "$TMP/COMPLETE"
mv -T "$TMP" "$DIR"
trap - EXIT
say "image built in $(( $(date +%s) - T0 ))s: $DIR"
if [ "${ZFSMGR_VM_CACHE_PRUNE:-0}" = 1 ]; then
    for d in "$CACHE"/*; do
        b=$(basename "$d")
        [[ $b =~ ^[0-9a-f]{64}$ ]] && [ "$b" != "$KEY" ] && { say "pruning old image $d"; remove_tree "$d"; }
    done
fi
echo "$DIR"
