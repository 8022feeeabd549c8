#!/bin/bash
# build-image.sh - build the Debian 12 VM image for zfsmgr's OpenZFS test tier:
# debootstrap bookworm (minbase) + kernel 6.1 + headers, udev, python3,
# python3-pytest, busybox-static, and zfs-dkms + zfsutils-linux (OpenZFS 2.3)
# from bookworm-backports; DKMS compiles the module for the image's kernel.
#
# Usage: build-image.sh OUTDIR          (as root; normally called by image.sh)
# Env:   ZFSMGR_VM_MIRROR      Debian mirror (default: from host apt sources,
#                              else http://deb.debian.org/debian)
#        ZFSMGR_VM_SECMIRROR   security mirror (default: from host apt sources,
#                              else http://deb.debian.org/debian-security)
#        ZFSMGR_VM_EXTRA_PKGS  extra Debian packages for the image (part of the
#                              cache key computed by image.sh)
#
# Produces in OUTDIR: vmlinuz, initrd.img, root.img (ext4, raw, sparse),
# image.env (versions), build.log and the apt logs. Needs root, network access
# to the Debian archive and ~3 GiB of free disk. Takes 6-10 min on 2 cores.
# Files it uses (hashed into the cache key by image.sh): guest-init.sh,
# initrd-init.sh next to this script.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
OUT=$1
ROOT=$OUT/rootfs
SUITE=bookworm
T0=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "build-image.sh: must run as root" >&2; exit 1; }
mkdir -p "$OUT"
exec > >(tee "$OUT/build.log") 2>&1

log() { echo "[build-image $(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }

# --- host tools (CI starts from a fresh Debian 12 machine)
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v chroot >/dev/null || need+=(coreutils)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
if [ ${#need[@]} -gt 0 ]; then
    log "installing host packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# --- mirrors: reuse whatever this host's apt uses (deb822 or one-line format)
srcs=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v "^[[:space:]]*#" || true)
MIRROR=${ZFSMGR_VM_MIRROR:-$(echo "$srcs" | grep -oE 'https?://[^ ]+/debian/?$' | head -1 || true)}
MIRROR=${MIRROR:-$(echo "$srcs" | grep -oE 'https?://[^ ]+/debian( |$)' | head -1 | tr -d ' ' || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECMIRROR=${ZFSMGR_VM_SECMIRROR:-$(echo "$srcs" | grep -oE 'https?://[^ ]+/debian-security/?' | head -1 || true)}
SECMIRROR=${SECMIRROR:-http://deb.debian.org/debian-security}
log "mirror: $MIRROR  security: $SECMIRROR"

# --- unmount anything left in the rootfs; never let rm cross into a mount
umount_all() {
    local m
    for m in dev/pts dev sys proc; do
        while mountpoint -q "$ROOT/$m" 2>/dev/null; do umount -l "$ROOT/$m" || break; done
    done
}
trap umount_all EXIT
umount_all
rm -rf --one-file-system "$ROOT" "$OUT/root.img" "$OUT/vmlinuz" "$OUT/initrd.img"

# --- 1. debootstrap
log "step 1: debootstrap $SUITE (minbase)"
debootstrap --variant=minbase --components=main,contrib "$SUITE" "$ROOT" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
    || { tail -30 "$OUT/debootstrap.log"; exit 1; }
log "step 1 done"

# --- 2. chroot setup, kernel and userland
cat > "$ROOT/etc/apt/sources.list" <<EOS
deb $MIRROR $SUITE main contrib
deb $MIRROR $SUITE-updates main contrib
deb $MIRROR $SUITE-backports main contrib
deb $SECMIRROR $SUITE-security main contrib
EOS
# no service may start inside the chroot
printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d"; chmod +x "$ROOT/usr/sbin/policy-rc.d"
echo zfsvm > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 zfsvm\n::1 localhost\n' > "$ROOT/etc/hosts"
echo '/dev/vda / ext4 rw,relatime 0 1' > "$ROOT/etc/fstab"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sys "$ROOT/sys"
mount --bind /dev "$ROOT/dev"
mount --bind /dev/pts "$ROOT/dev/pts"
CH() { DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 chroot "$ROOT" "$@"; }

log "step 2: apt-get update + kernel, headers, udev, python3, pytest"
CH apt-get update -qq
# python3-waitress/-bottle/-dotenv: zfsmgr's runtime libraries, so in-VM tests
# can drive the package end to end without a network
# shellcheck disable=SC2086
CH apt-get install -y -qq --no-install-recommends \
    linux-image-amd64 linux-headers-amd64 initramfs-tools udev kmod iproute2 \
    procps psmisc util-linux e2fsprogs python3 python3-pytest \
    python3-waitress python3-bottle python3-dotenv \
    less strace busybox-static cpio ${ZFSMGR_VM_EXTRA_PKGS:-} \
    >"$OUT/apt-kernel.log" 2>&1 || { tail -30 "$OUT/apt-kernel.log"; exit 1; }
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -1)
log "step 2 done: kernel $KVER"

# --- 3. OpenZFS from backports; DKMS compiles the module for $KVER (not for
# the host's running kernel)
log "step 3: zfs-dkms + zfsutils-linux from $SUITE-backports (DKMS build, the long step)"
CH apt-get install -y -qq --no-install-recommends -t "$SUITE-backports" \
    zfs-dkms zfsutils-linux >"$OUT/apt-zfs.log" 2>&1 || { tail -40 "$OUT/apt-zfs.log"; exit 1; }
ZVER=$(CH dpkg-query -W -f='${Version}' zfsutils-linux)
if ! ls "$ROOT/lib/modules/$KVER/updates/dkms/"zfs.ko* >/dev/null 2>&1; then
    log "module not built by postinst; running dkms autoinstall -k $KVER"
    CH dkms autoinstall -k "$KVER" >>"$OUT/apt-zfs.log" 2>&1 || { tail -40 "$OUT/apt-zfs.log"; exit 1; }
fi
ls "$ROOT/lib/modules/$KVER/updates/dkms/"zfs.ko* >/dev/null || { echo "zfs.ko missing" >&2; exit 1; }
CH depmod -a "$KVER"
case "$ZVER" in 2.3.*) ;; *) echo "expected OpenZFS 2.3.x from $SUITE-backports, got $ZVER" >&2; exit 1;; esac
log "step 3 done: zfs $ZVER module built for $KVER"

# --- 4. our init + a tiny busybox initramfs
install -m 755 "$HERE/guest-init.sh" "$ROOT/sbin/vm-init"
CH zgenhostid -f 0x5a465356   # fixed hostid: pools import without -f
IRD=$ROOT/tmp/initrd.d
rm -rf "$IRD"; mkdir -p "$IRD"/{bin,dev,proc,sys,newroot,mods}
cp "$ROOT/bin/busybox" "$IRD/bin/busybox"
mods=$(for m in virtio_pci virtio_blk crc32c_generic ext4; do CH modprobe -S "$KVER" --show-depends "$m"; done \
       | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++')
n=0; : > "$IRD/mods/order"
for m in $mods; do
    n=$((n+1)); f=$(printf '%02d-%s' "$n" "$(basename "$m")")
    cp "$ROOT$m" "$IRD/mods/$f"; echo "$f" >> "$IRD/mods/order"
done
install -m 755 "$HERE/initrd-init.sh" "$IRD/init"
CH sh -c 'cd /tmp/initrd.d && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0' > "$OUT/initrd.img"
rm -rf "$IRD"
cp "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
chmod 644 "$OUT/vmlinuz" "$OUT/initrd.img"
CH apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/*
PYVER=$(CH python3 -c 'import sys; print(sys.version.split()[0])')
PYTESTVER=$(CH python3 -c 'import pytest; print(pytest.__version__)')
umount_all
log "step 4 done: init + initramfs"

# --- 5. ext4 image straight from the directory (no loop device). mkfs.ext4 -d
# fails ("Permission denied while opening auxv") if /proc is still mounted in it.
log "step 5: mkfs.ext4 -d"
if grep -qF " $ROOT/" /proc/mounts; then echo "something is still mounted under $ROOT" >&2; exit 1; fi
used_mb=$(du -sm "$ROOT" | cut -f1)
size_mb=$(( used_mb + 2048 ))
truncate -s "${size_mb}M" "$OUT/root.img"
mkfs.ext4 -q -F -L zfsvm-root -d "$ROOT" "$OUT/root.img"
cat > "$OUT/image.env" <<EOF
KVER=$KVER
ZFS_VERSION=$ZVER
PYTHON_VERSION=$PYVER
PYTEST_VERSION=$PYTESTVER
ROOTFS_USED_MB=$used_mb
IMAGE_SIZE_MB=$size_mb
BUILT=$(date -u +%FT%TZ)
BUILD_SECONDS=$(( $(date +%s) - T0 ))
EOF
rm -rf --one-file-system "$ROOT"
log "done: $OUT/root.img (${size_mb} MiB apparent, $(du -sm "$OUT/root.img" | cut -f1) MiB on disk)"
cat "$OUT/image.env"
