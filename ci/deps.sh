#!/usr/bin/env bash
# Installs the Debian packages om's test suite needs, when they are missing. A fresh machine has only
# the Rust toolchain, gcc and python3. Needs root to install; without root it names what is missing.
set -euo pipefail

# command -> Debian package
declare -A NEED=(
  [ip]=iproute2      # the rig: network namespaces, veth, bridge
  [pgrep]=procps     # rig tests find processes
  [sh]=dash
  [setpriv]=util-linux # dirty-tracking tests run a process unprivileged
  [sqlite3]=sqlite3  # a restart test runs the sqlite3 CLI
  [mpirun]=openmpi-bin # omrun under mpirun (lib/restore/tests/launchers.rs)
  # omrun under srun: a one-node Slurm cluster in a rig node (ci/src/slurm.rs)
  [srun]=slurm-client
  [slurmd]=slurmd
  [slurmctld]=slurmctld
  [munged]=munge
  [nsenter]=util-linux
  # the soft-RoCE rig (ci/rxe): a QEMU guest built from this machine's packages
  [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static
  [ib_write_bw]=perftest
  [ibv_devinfo]=ibverbs-utils
  [strip]=binutils
)

# file -> Debian package (libraries and headers, which no command stands for)
declare -A NEED_FILES=(
  [/usr/lib/x86_64-linux-gnu/libibverbs.so.1]=libibverbs1
  [/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so]=ibverbs-providers
  [/usr/include/infiniband/verbs.h]=libibverbs-dev # verbs/tests/layout.rs checks om's ABI structs
)

# cbindgen generates om.h; CI checks the committed header against it (a Rust tool, from crates.io).
CBINDGEN_VERSION=0.29.2
if ! cbindgen --version 2>/dev/null | grep -q " $CBINDGEN_VERSION\$"; then
  echo "ci/deps.sh: installing cbindgen $CBINDGEN_VERSION" >&2
  cargo install --quiet --locked --version "$CBINDGEN_VERSION" cbindgen
fi

missing=()
for cmd in "${!NEED[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
for f in "${!NEED_FILES[@]}"; do
  [ -e "$f" ] || missing+=("${NEED_FILES[$f]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ci/deps.sh: missing Debian packages: ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "ci/deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
