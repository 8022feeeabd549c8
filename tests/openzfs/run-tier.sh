#!/bin/bash
# run-tier.sh - zfsmgr's OpenZFS test tier: run tests/openzfs (pytest, marker
# "openzfs") on real OpenZFS 2.3 inside a QEMU VM, booted once per run.
#
# Usage: bash tests/openzfs/run-tier.sh [extra pytest args...]     (as root)
#
# Steps: install qemu if missing (Debian 12) -> image.sh (cached image, built
# on first use) -> boot the VM with the checkout shared read-only at /checkout
# (virtio-9p), a writable 9p scratch folder at /scratch, an ext4 scratch disk
# at /var/tmp and blank disks -> run pytest in the guest, streaming its output
# to stdout live -> power off.
#
# Exit status: the guest pytest's status (0 only if pytest passed AND its
# junit report shows at least one test and no failure/error; 5 = no tests
# collected is a failure), 124 if ZFSMGR_VM_TIMEOUT expired, 125 if the VM or
# the tier could not run (image build, boot, share or scratch disk failed).
#
# Env: ZFSMGR_VM_ACCEL     auto (default) | tcg | kvm. auto uses KVM only when
#                          /dev/kvm is usable and is not the paravirtual PVM
#                          flavour (which cannot boot Debian's kernel), and
#                          falls back to TCG if the KVM guest is not up within
#                          ZFSMGR_VM_KVM_PROBE seconds (default 60).
#      ZFSMGR_VM_TIMEOUT   seconds for the whole VM run (default 1500)
#      ZFSMGR_VM_BOOT_TIMEOUT  seconds until the guest must be up (default 300)
#      ZFSMGR_VM_MEM       guest MiB (default 2048); ZFSMGR_VM_CPUS (default 2)
#      ZFSMGR_VM_DISK_SIZE size of the ext4 scratch disk at /var/tmp (default 8G)
#      ZFSMGR_VM_BLANK_DISKS  number of blank 1 GiB disks (default 2), seen in
#                          the guest as /dev/disk/by-id/virtio-zdisk1.. and
#                          listed in the guest env var of the same name
#      ZFSMGR_VM_JUNIT     copy the guest's junit XML report to this host path
#      ZFSMGR_VM_KEEP=1    keep the run folder (console log, junit) and print it
#      ZFSMGR_VM_IMAGE, ZFSMGR_VM_CACHE, ZFSMGR_VM_EXTRA_PKGS: see image.sh
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
TIMEOUT=${ZFSMGR_VM_TIMEOUT:-1500}
BOOT_TIMEOUT=${ZFSMGR_VM_BOOT_TIMEOUT:-300}
KVM_PROBE=${ZFSMGR_VM_KVM_PROBE:-60}
MEM=${ZFSMGR_VM_MEM:-2048}
CPUS=${ZFSMGR_VM_CPUS:-2}
NBLANK=${ZFSMGR_VM_BLANK_DISKS:-2}
ACCEL=${ZFSMGR_VM_ACCEL:-auto}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }
say() { echo "run-tier: $*" >&2; }
die() { say "ERROR: $*"; exit 125; }
T_START=$(now)

case "$ACCEL" in auto|tcg|kvm) ;; *) die "ZFSMGR_VM_ACCEL must be auto, tcg or kvm (got $ACCEL)";; esac
case "$CHECKOUT" in *,*) die "the checkout path must not contain a comma (QEMU option syntax): $CHECKOUT";; esac

# --- host tools (a fresh Debian 12 CI machine has none of them)
need=()
command -v qemu-system-x86_64 >/dev/null && [ -e /usr/share/qemu/qboot.rom ] || need+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v flock >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${need[*]} and not root to install them"
    say "installing host packages: ${need[*]}"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2 \
        || die "apt-get install ${need[*]} failed"
fi

# --- 0. the zipapp the guest runs (tests/rig.py: dist/zfsmgr.pyz): built from this checkout,
# so the tier never tests a stale build (reproducible: the same bytes as run-all.sh's build)
python3 "$CHECKOUT/build_zipapp.py" >&2 || die "build_zipapp.py failed"

# --- 1. the image (cached; built on first use)
T_IMG=$(now)
IMG=$(bash "$HERE/image.sh") || die "no VM image (image.sh failed)"
IMG_SECS=$(since "$T_IMG")
say "image ready in ${IMG_SECS}s: $IMG"
[ -f "$IMG/image.env" ] && say "image: $(tr '\n' ' ' < "$IMG/image.env")"

# --- 2. the run folder: control share, scratch share, scratch + blank disks
RUN=$(mktemp -d "${TMPDIR:-/tmp}/zfsmgr-openzfs.XXXXXX") || die "mktemp failed"
QPID=""; TAILPID=""
cleanup() {
    [ -n "$QPID" ] && kill "$QPID" 2>/dev/null
    [ -n "$TAILPID" ] && kill "$TAILPID" 2>/dev/null
    if [ "${ZFSMGR_VM_KEEP:-0}" = 1 ]; then say "run folder kept: $RUN"; else rm -rf --one-file-system "$RUN"; fi
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM HUP
mkdir -p "$RUN/ctl" "$RUN/scratch"
chmod 777 "$RUN/scratch"
truncate -s "${ZFSMGR_VM_DISK_SIZE:-8G}" "$RUN/vartmp.img" || die "cannot create the scratch disk"
mkfs.ext4 -q -F -L vartmp -E lazy_itable_init=1,lazy_journal_init=1 "$RUN/vartmp.img" || die "mkfs.ext4 of the scratch disk failed"
disks=(-drive "file=$RUN/vartmp.img,if=none,id=vartmp,format=raw,cache=unsafe,discard=unmap"
       -device "virtio-blk-pci,drive=vartmp,serial=vartmp")
blank=""
for i in $(seq 1 "$NBLANK"); do
    truncate -s 1G "$RUN/zdisk$i.img"
    disks+=(-drive "file=$RUN/zdisk$i.img,if=none,id=zdisk$i,format=raw,cache=unsafe,discard=unmap"
            -device "virtio-blk-pci,drive=zdisk$i,serial=zdisk$i")
    blank="$blank /dev/disk/by-id/virtio-zdisk$i"
done
printf 'checkout /checkout ro\nscratch /scratch\n' > "$RUN/ctl/shares"

# the guest job (run by /sbin/vm-init with bash; stderr is merged into stdout)
{
    cat <<'EOF'
exec 2>&1
set -u
dev=/dev/disk/by-id/virtio-vartmp
if [ ! -b "$dev" ]; then
    for b in /sys/block/vd*; do [ "$(cat "$b/serial" 2>/dev/null)" = vartmp ] && dev=/dev/${b##*/}; done
fi
mount -o noatime "$dev" /var/tmp || { echo "guest: cannot mount the scratch disk $dev at /var/tmp"; exit 125; }
chmod 1777 /var/tmp
[ -f /checkout/tests/openzfs/conftest.py ] || { echo "guest: /checkout/tests/openzfs/conftest.py not found: checkout share not mounted"; exit 125; }
mountpoint -q /scratch || { echo "guest: /scratch share not mounted"; exit 125; }
export ZFSMGR_IN_VM=1 PYTHONPATH=/checkout PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export TMPDIR=/var/tmp ZFSMGR_VM_SCRATCH=/scratch
echo "guest: kernel $(uname -r), $(zfs version 2>&1 | tr '\n' ' '), $(python3 -V 2>&1)"
cd /checkout || exit 125
EOF
    printf 'export ZFSMGR_VM_BLANK_DISKS=%q\n' "${blank# }"
    printf 'python3 -m pytest -v -p no:cacheprovider tests/openzfs -m openzfs --rootdir=/checkout -o cache_dir=/tmp/pc --junitxml=/scratch/junit.xml'
    [ $# -gt 0 ] && printf ' %q' "$@"   # (printf with no argument would add '')
    echo
    cat <<'EOF'
rc=$?
# "tests failures errors skipped" from the junit report, for the host's cross-check
python3 - /scratch/junit.xml > /scratch/junit-summary 2>/dev/null <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = [sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")]
print(*n)
PY
exit $rc
EOF
} > "$RUN/ctl/cmd"

# --- 3. accelerator
kvm_usable() {
    [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ] || return 1
    # the PVM flavour of nested KVM dies on a stock Debian kernel
    [ -d /sys/module/kvm_pvm ] && return 1
    grep -qwE 'vmx|svm' /proc/cpuinfo
}
ATTEMPTS=()
case "$ACCEL" in
    tcg) ATTEMPTS=(tcg);;
    kvm) [ -c /dev/kvm ] || die "ZFSMGR_VM_ACCEL=kvm but there is no /dev/kvm"; ATTEMPTS=(kvm);;
    auto) if kvm_usable; then ATTEMPTS=(kvm tcg); else ATTEMPTS=(tcg); fi;;
esac

# --- 4. boot once, run, power off
# boot_vm ACCEL PROBE: 0 = the guest ran the job (rc file written), 2 = guest
# not up within PROBE seconds (only when PROBE > 0: caller may retry), 124 =
# timeout, 125 = VM failure
boot_vm() {
    local accel=$1 probe=$2 accargs t0 ready="" qrc
    case "$accel" in
        kvm) accargs=(-accel kvm -cpu host);;
        tcg) accargs=(-accel tcg,thread=multi,tb-size=512 -cpu max);;
    esac
    rm -f "$RUN/ctl/rc" "$RUN/ctl/rc.tmp"
    : > "$RUN/console.log"; : > "$RUN/stderr"
    say "booting the VM ($accel, ${MEM} MiB, $CPUS vCPUs; timeout ${TIMEOUT}s)"
    t0=$(now)
    timeout -k 10 "$((TIMEOUT + 30))" qemu-system-x86_64 \
        "${accargs[@]}" -M q35 -m "$MEM" -smp "$CPUS" \
        -nodefaults -no-user-config -display none -vga none -monitor none -no-reboot \
        -bios /usr/share/qemu/qboot.rom \
        -kernel "$IMG/vmlinuz" -initrd "$IMG/initrd.img" \
        -append "root=/dev/vda rw console=ttyS0 init=/sbin/vm-init quiet loglevel=3 panic=-1 fsck.mode=skip" \
        -drive "file=$IMG/root.img,if=none,id=root,format=raw,snapshot=on,cache=unsafe" \
        -device virtio-blk-pci,drive=root \
        "${disks[@]}" \
        -chardev "file,id=con,path=$RUN/console.log" -serial chardev:con \
        -device virtio-serial-pci,id=vser \
        -chardev stdio,id=out,signal=off -device virtconsole,chardev=out,bus=vser.0 \
        -chardev "file,id=err,path=$RUN/stderr" -device virtconsole,chardev=err,bus=vser.0 \
        -fsdev "local,id=ctl,path=$RUN/ctl,security_model=none" -device virtio-9p-pci,fsdev=ctl,mount_tag=vmrun \
        -fsdev "local,id=co,path=$CHECKOUT,security_model=none,readonly=on" -device virtio-9p-pci,fsdev=co,mount_tag=checkout \
        -fsdev "local,id=sc,path=$RUN/scratch,security_model=none" -device virtio-9p-pci,fsdev=sc,mount_tag=scratch \
        -nic none </dev/null &
    QPID=$!
    while kill -0 "$QPID" 2>/dev/null; do
        if [ -z "$ready" ] && grep -q 'vm-init: ready' "$RUN/console.log"; then
            ready=$(since "$t0"); BOOT_SECS=$ready
            say "guest up after ${ready}s ($(grep -o 'vm-init: ready.*' "$RUN/console.log" | head -1)); running pytest"
        fi
        if [ -z "$ready" ] && [ "$probe" -gt 0 ] && awk -v a="$t0" -v b="$(now)" -v p="$probe" 'BEGIN{exit !(b-a > p)}'; then
            say "guest not up after ${probe}s with $accel"
            kill "$QPID" 2>/dev/null; wait "$QPID" 2>/dev/null; QPID=""; return 2
        fi
        if [ -z "$ready" ] && awk -v a="$t0" -v b="$(now)" -v p="$BOOT_TIMEOUT" 'BEGIN{exit !(b-a > p)}'; then
            say "guest not up after ${BOOT_TIMEOUT}s (ZFSMGR_VM_BOOT_TIMEOUT); console tail:"
            tail -40 "$RUN/console.log" >&2
            kill "$QPID" 2>/dev/null; wait "$QPID" 2>/dev/null; QPID=""; return 125
        fi
        if awk -v a="$t0" -v b="$(now)" -v p="$TIMEOUT" 'BEGIN{exit !(b-a > p)}'; then
            echo >&2
            say "TIMEOUT: the VM run exceeded ZFSMGR_VM_TIMEOUT=${TIMEOUT}s; killing it. console tail:"
            tail -20 "$RUN/console.log" >&2
            kill "$QPID" 2>/dev/null; wait "$QPID" 2>/dev/null; QPID=""; return 124
        fi
        sleep 0.5
    done
    wait "$QPID"; qrc=$?; QPID=""
    VM_SECS=$(since "$t0")
    if [ -s "$RUN/stderr" ]; then say "guest init stderr:"; cat "$RUN/stderr" >&2; fi
    if [ ! -f "$RUN/ctl/rc" ]; then
        say "the VM stopped (qemu status $qrc) without finishing the job; console tail:"
        tail -40 "$RUN/console.log" >&2
        [ -z "$ready" ] && [ "$probe" -gt 0 ] && return 2
        return 125
    fi
    return 0
}

BOOT_SECS="?"; VM_SECS="?"; status=125
for accel in "${ATTEMPTS[@]}"; do
    probe=0; [ "$accel" = kvm ] && [ "$ACCEL" = auto ] && probe=$KVM_PROBE
    boot_vm "$accel" "$probe"; status=$?
    [ $status = 2 ] && { say "falling back from $accel"; status=125; continue; }
    break
done
[ $status = 0 ] || exit $status

# --- 5. verdict: the guest pytest status, cross-checked with its junit report
rc=$(cat "$RUN/ctl/rc")
[[ $rc =~ ^[0-9]+$ ]] || { say "bad exit status from the guest: '$rc'"; exit 125; }
guest_rc=$rc
[ -n "${ZFSMGR_VM_JUNIT:-}" ] && [ -f "$RUN/scratch/junit.xml" ] && cp "$RUN/scratch/junit.xml" "$ZFSMGR_VM_JUNIT"
summary=$(cat "$RUN/scratch/junit-summary" 2>/dev/null)
[[ $summary =~ ^[0-9]+\ [0-9]+\ [0-9]+\ [0-9]+$ ]] || summary=""
if [ "$rc" = 0 ]; then
    read -r ntests nfail nerr nskip <<<"${summary:-0 0 0 0}"
    if [ -z "$summary" ] || [ "$ntests" -le $((nskip)) ] || [ $((nfail + nerr)) -gt 0 ]; then
        say "guest pytest exited 0 but its junit report says: ${summary:-missing} (tests failures errors skipped) -> failing the tier"
        rc=1
    fi
fi
[ "$rc" = 5 ] && say "pytest collected no tests (exit 5): the tier must run tests -> failing"
say "timings: image ${IMG_SECS}s, boot ${BOOT_SECS}s, VM total ${VM_SECS}s, tier total $(since "$T_START")s"
say "junit (tests failures errors skipped): ${summary:-none}; guest pytest exit status $guest_rc; tier exit status $rc"
exit "$rc"
