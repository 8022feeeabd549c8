#!/bin/busybox sh
# /init of the tiny busybox initramfs built by build-image.sh: load the virtio
# and ext4 modules listed in /mods/order, mount /dev/vda, switch_root to
# /sbin/vm-init (guest-init.sh). Debian's generic initramfs + udev coldplug
# costs ~10 s more per boot under TCG emulation.
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
for m in $(/bin/busybox cat /mods/order); do /bin/busybox insmod /mods/$m 2>/dev/null; done
i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox sleep 0.05; i=$((i+1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /newroot; then
    echo "initrd: FATAL: cannot mount /dev/vda" > /dev/console
    echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger; /bin/busybox sleep 30
fi
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/vm-init
