#!/usr/bin/env bash
# The soft-RoCE rig: a QEMU guest (TCG) running Debian's 6.1 kernel (or, with OM_RXE_KERNEL=odp, the
# newest of Debian 13's backports) with rdma_rxe, two rxe devices on a
# veth pair, and a script of ours as its job.
#
#   ci/rxe/guest.sh SCRIPT [FILE...]
#
# builds an initramfs from busybox, the kernel's modules, rdma-core (libibverbs, the rxe provider),
# perftest and iproute2 from this machine's Debian packages, plus every FILE (executables get the
# shared libraries they need), boots it, runs SCRIPT inside (as /job, with every FILE under /om/ by
# its base name) and exits with SCRIPT's exit status. The guest's console is this script's output.
#
# Inside the guest: rxe0 on veth0 (10.0.0.1) and rxe1 on veth1 (10.0.0.2), joined by the veth pair;
# policy routing sends traffic between the two addresses over the pair (not the loopback), so RDMA
# between rxe0 and rxe1 really crosses it. /dev/shm and /tmp are tmpfs.
#
# Needs: qemu-system-x86, busybox-static, ibverbs-providers, perftest, iproute2 (ci/deps.sh installs
# them) and the kernel package, which this script downloads once (apt-get download) into the cache,
# $OM_RXE_CACHE (default ~/.cache/om/rxe). Timeout: $OM_RXE_TIMEOUT seconds (default 600).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# Downloads are kept per machine, not per clone: a fresh clone (as CI makes) reuses them.
cache=${OM_RXE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/om/rxe}
[ $# -ge 1 ] || { echo "usage: $0 SCRIPT [FILE...]" >&2; exit 2; }
job=$1
shift

mkdir -p "$cache"
# The kernel, downloaded once per kind into $cache/linux-KIND (vmlinuz and the module tree):
# - 6.1 (the default): Debian 12's current 6.1 image, from this machine's apt sources;
# - odp ($OM_RXE_KERNEL=odp): the newest image of Debian 13's backports, whose rxe has on-demand
#   paging (Linux 6.14 and later). apt fetches it with a configuration of its own, checking the
#   archive's signature against Debian's keyring, and leaves this machine's sources alone.
kind=${OM_RXE_KERNEL:-6.1}
kdir=$cache/linux-$kind
if [ ! -f "$kdir/vmlinuz" ]; then
  apt=()
  case $kind in
    6.1) pattern='linux-image-6\.1\.' ;;
    odp)
      pattern='linux-image-[0-9]'
      a=$cache/apt-odp
      mkdir -p "$a/lists/partial" "$a/cache/archives/partial"
      echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie-backports main" \
        >"$a/sources.list"
      apt=(-o "Dir::Etc::SourceList=$a/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$a/lists" -o "Dir::Cache=$a/cache" -o Dir::State::Status=/dev/null
        -o Debug::NoLocking=1)
      apt-get "${apt[@]}" update -qq >/dev/null || { echo "guest.sh: cannot read Debian's trixie-backports" >&2; exit 1; }
      ;;
    *) echo "guest.sh: OM_RXE_KERNEL is 6.1 or odp, not $kind" >&2; exit 2 ;;
  esac
  latest() { apt-cache "${apt[@]}" depends linux-image-amd64 2>/dev/null | awk -v p="Depends: $pattern" '$0 ~ p {print $2; exit}'; }
  pkg=$(latest)
  [ -n "$pkg" ] || { apt-get update -qq >/dev/null 2>&1 || true; pkg=$(latest); }
  [ -n "$pkg" ] || { echo "guest.sh: no $pattern package known to apt" >&2; exit 1; }
  # Newer Debian kernels put the image and the modules in packages of their own.
  pkgs=("$pkg")
  for part in binary modules; do
    extra=linux-$part-${pkg#linux-image-}
    apt-cache "${apt[@]}" show "$extra" >/dev/null 2>&1 && pkgs+=("$extra")
  done
  rm -rf "$kdir.new" && mkdir -p "$kdir.new/deb"
  (cd "$kdir.new/deb" && apt-get "${apt[@]}" download "${pkgs[@]}" >/dev/null 2>&1 &&
    for d in ./*.deb; do dpkg-deb -x "$d" ..; done) || { echo "guest.sh: cannot download ${pkgs[*]}" >&2; exit 1; }
  rm -rf "$kdir.new/deb"
  cp "$(find "$kdir.new" -name 'vmlinuz*' -type f | head -1)" "$kdir.new/vmlinuz"
  rm -rf "$kdir" && mv "$kdir.new" "$kdir"
fi
modules=$(find "$kdir" -path '*/modules/*/kernel' -type d | head -1)

work=$(mktemp -d "${TMPDIR:-/tmp}/om-rxe.XXXXXX")
trap 'rm -rf "$work"' EXIT
fs=$work/fs
mkdir -p "$fs"/{bin,sbin,dev,proc,sys,tmp,run,lib/modules,etc/libibverbs.d,om,lib64}

# Copies an executable or library and, for dynamic ones, every shared library it loads.
add_elf() {
  local f=$1 dest=$2
  install -D -m 755 "$f" "$fs$dest"
  # Debug information only costs the guest memory and boot time.
  strip --strip-debug "$fs$dest" 2>/dev/null || true
  ldd "$f" 2>/dev/null | awk '/=>/ {print $3} /^\t\// {print $1}' | while read -r lib; do
    [ -e "$lib" ] || continue
    [ -e "$fs$lib" ] || install -D -m 755 "$(readlink -f "$lib")" "$fs$lib"
  done
}

cp /bin/busybox "$fs/bin/busybox"
for app in sh mount mkdir cat echo sleep poweroff insmod ls grep sed kill ps dd cmp head tail env \
  ln chmod rm sync seq awk wc cut tr date timeout mknod printf true false test sort uniq diff; do
  ln -s busybox "$fs/bin/$app"
done
# Debian's busybox runs its own `ip` applet before $PATH: the job must call /sbin/ip.
add_elf /sbin/ip /sbin/ip
add_elf "$(command -v rdma)" /sbin/rdma
for tool in ib_write_bw ibv_devinfo ibv_rc_pingpong; do
  add_elf "$(command -v $tool)" "/bin/$tool"
done
# The rxe provider, and libgcc_s (pthread_cancel of perftest and rping loads it).
add_elf /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so
cp /etc/libibverbs.d/rxe.driver "$fs/etc/libibverbs.d/"
for lib in /lib/x86_64-linux-gnu/libgcc_s.so.1; do install -D "$lib" "$fs$lib"; done

# The modules rxe needs, each after what it depends on (from its .modinfo), uncompressed for
# busybox's insmod. 6.1's rxe asks the crypto API for crc32 at run time, which has no modprobe here.
modfile() { find "$modules" -name "$1.ko" -o -name "$1.ko.xz" | head -1; }
modcat() { case $1 in *.xz) xz -dc "$1" ;; *) cat "$1" ;; esac; }
order=
want() {
  local m=$1 f d
  case " $order " in *" $m "*) return ;; esac
  f=$(modfile "$m")
  [ -n "$f" ] || { echo "guest.sh: no module $m in $modules" >&2; exit 1; }
  for d in $(modcat "$f" | tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '); do want "$d"; done
  modcat "$f" >"$fs/lib/modules/$m.ko"
  order="$order $m"
}
for m in crc32_generic crc32-pclmul; do [ -z "$(modfile "$m")" ] || want "$m"; done
for m in rdma_rxe ib_uverbs veth; do want "$m"; done

for f in "$@"; do
  if file -L "$f" | grep -q ELF; then add_elf "$f" "/om/$(basename "$f")"; else install -D -m 755 "$f" "$fs/om/$(basename "$f")"; fi
done
install -m 755 "$job" "$fs/job"
# The job's settings from this environment (OM_RXE_BENCH_*: the benchmark's size and runs;
# OM_RXE_ODP_*: what the ODP job runs).
for v in $(compgen -e | grep -E '^OM_RXE_(BENCH|ODP)_' || true); do
  printf "export %s='%s'\n" "$v" "${!v}"
done >"$fs/env"

cat >"$fs/init" <<EOF
#!/bin/sh
export PATH=/om:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs tmp /dev/shm
mount -t tmpfs tmp /tmp
mount -t devpts pts /dev/pts
for m in $order; do insmod /lib/modules/\$m.ko || echo "insmod \$m failed"; done
/sbin/ip link set lo up
/sbin/ip link add veth0 type veth peer name veth1
/sbin/ip addr add 10.0.0.1/24 dev veth0
/sbin/ip addr add 10.0.0.2/24 dev veth1
/sbin/ip link set veth0 up
/sbin/ip link set veth1 up
# Both addresses are local: without policy routing the kernel would deliver over lo, where no rxe
# device listens. Traffic to each address leaves by the other end of the pair; what arrives on the
# pair is delivered locally.
echo 1 > /proc/sys/net/ipv4/conf/all/accept_local
for i in all veth0 veth1; do echo 0 > /proc/sys/net/ipv4/conf/\$i/rp_filter; done
/sbin/ip route add 10.0.0.2/32 dev veth0 src 10.0.0.1 table 100
/sbin/ip route add 10.0.0.1/32 dev veth1 src 10.0.0.2 table 101
/sbin/ip rule add pref 10 iif veth0 lookup local
/sbin/ip rule add pref 11 iif veth1 lookup local
/sbin/ip rule add pref 20 to 10.0.0.2 lookup 100
/sbin/ip rule add pref 21 to 10.0.0.1 lookup 101
/sbin/ip rule add pref 1000 lookup local
/sbin/ip rule del pref 0
/sbin/rdma link add rxe0 type rxe netdev veth0
/sbin/rdma link add rxe1 type rxe netdev veth1
chmod 666 /dev/infiniband/* 2>/dev/null
cd /tmp
. /env
echo "== rxe guest up: \$(ls /sys/class/infiniband | tr '\n' ' ')"
sh /job
echo "== rxe guest job exit \$?"
sync
poweroff -f
EOF
chmod 755 "$fs/init"

(cd "$fs" && find . | busybox cpio -o -H newc 2>/dev/null) | gzip -1 >"$work/initrd"

echo "== guest.sh: kernel $kind, initramfs of $(du -k "$work/initrd" | cut -f1) KiB, ready after ${SECONDS} s"
log=$work/console
set +e
timeout "${OM_RXE_TIMEOUT:-600}" qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp 2 -m "${OM_RXE_MEMORY:-2048}" \
  -nographic -no-reboot -nic none \
  -kernel "$kdir/vmlinuz" -initrd "$work/initrd" \
  -append "console=ttyS0 quiet panic=-1 oops=panic rdinit=/init" </dev/null | tee "$log"
qemu=${PIPESTATUS[0]}
set -e
status=$(sed -n 's/^== rxe guest job exit \([0-9]*\).*/\1/p' "$log" | tail -1)
if [ -z "$status" ]; then
  echo "guest.sh: the guest did not finish its job (qemu exit $qemu)" >&2
  exit 1
fi
exit "$status"
