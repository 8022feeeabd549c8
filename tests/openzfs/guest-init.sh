#!/bin/sh
# PID 1 of the OpenZFS test VM (installed as /sbin/vm-init by build-image.sh).
# Sets up a minimal system, mounts the 9p control share "vmrun" at /vmrun and
# the extra shares listed in /vmrun/shares ("tag guestpath [ro]" per line),
# runs /vmrun/cmd with bash: stdout -> /dev/hvc0, stderr -> /dev/hvc1.
# Writes the command's exit status to /vmrun/rc, exports all pools, powers off.
# Progress lines ("vm-init: ...") go to the serial console (ttyS0), which the
# host keeps as console.log and uses to measure boot time.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=dumb
poweroff_now() {
    sync
    echo 1 > /proc/sys/kernel/sysrq
    echo o > /proc/sysrq-trigger
    sleep 30
}
say() { echo "vm-init: $*" > /dev/ttyS0; }
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys  || mount -t sysfs sys /sys
mountpoint -q /dev  || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mountpoint -q /run || mount -t tmpfs tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw /
hostname zfsvm
ip link set lo up
modprobe -q 9pnet_virtio; modprobe -q 9p; modprobe -q virtio_console
mkdir -p /vmrun
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 vmrun /vmrun; then
    say "FATAL: cannot mount the vmrun share"; poweroff_now
fi
if [ -f /vmrun/shares ]; then
    while read -r tag path opts; do
        [ -n "$tag" ] || continue
        mkdir -p "$path"
        mount -t 9p -o "trans=virtio,version=9p2000.L,msize=262144${opts:+,$opts}" "$tag" "$path" \
            || say "ERROR: cannot mount share $tag at $path"
    done < /vmrun/shares
fi
# udevd creates /dev/disk/by-id links and /dev/zvol/...; coldplug only block
# devices (a full trigger costs ~9 s under TCG)
/lib/systemd/systemd-udevd --daemon >/dev/null 2>&1
udevadm trigger --action=add --subsystem-match=block >/dev/null 2>&1
udevadm settle --timeout=10 >/dev/null 2>&1
modprobe zfs || say "ERROR: modprobe zfs failed"
for i in 1 2 3 4 5 6 7 8 9 10; do [ -c /dev/hvc1 ] && break; sleep 0.2; done
[ -f /etc/hostid ] || zgenhostid >/dev/null 2>&1
say "ready $(cut -d' ' -f1 /proc/uptime)s"
cd /root
if [ -f /vmrun/env ]; then set -a; . /vmrun/env; set +a; fi
# hvc* are ttys: keep them open (termios is reset on last close) and raw (no
# \n -> \r\n); the command itself gets pipes, not ttys
exec 3<>/dev/hvc0 4<>/dev/hvc1
stty raw -echo <&3 2>/dev/null; stty raw -echo <&4 2>/dev/null
mkfifo /run/vm-err
cat /run/vm-err >&4 & errcat=$!
{ /bin/bash /vmrun/cmd </dev/null 2>/run/vm-err 3>&- 4>&-; echo $? > /run/vm-rc; } | cat >&3
wait $errcat
cp /run/vm-rc /vmrun/rc.tmp && mv /vmrun/rc.tmp /vmrun/rc
say "done rc=$(cat /run/vm-rc) $(cut -d' ' -f1 /proc/uptime)s"
zpool export -a >/dev/null 2>&1
poweroff_now
