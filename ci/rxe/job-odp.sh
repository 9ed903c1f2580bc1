# Runs inside the soft-RoCE guest booted with OM_RXE_KERNEL=odp (ci/rxe/guest.sh): a kernel whose rxe
# offers on-demand paging. om's binaries are in /om, rxe0 has 10.0.0.1 and rxe1 10.0.0.2. Fails on
# the first failing step.
set -e
. /om/common.sh

step "on-demand paging offered: $(uname -r)"
# rxe's on-demand copy is only sound with page-sized packets (om_verbs::odp::RXE_SMALL_MTU): an
# Ethernet MTU of 9000 gives the RoCE path MTU of 4096.
for d in veth0 veth1; do /sbin/ip link set $d mtu 9000; done
ibv_devinfo -v -d rxe0 | grep -E "vendor_id|active_mtu" || fail "ibv_devinfo"
ibv_devinfo -v -d rxe0 | grep -A4 "general_odp_caps" || fail "ibv_devinfo"

step "verbs transport tests on demand, required here (page-server/tests/verbs.rs)"
# The others ran in the 6.1 guest; OM_RXE_ODP_ALL=1 runs every one here too.
filter="on_demand memory_moved"
[ -n "${OM_RXE_ODP_ALL:-}" ] && filter=
OM_VERBS_EXPECT_ODP=1 OM_OMD=/om/omd OM_VERBS_TEST_ADDR=10.0.0.2 verbs-tests --ignored --test-threads=1 $filter

step "on-demand windows refuse a path too small for them (rxe0 at MTU 1024, rxe1 at 4096)"
/sbin/ip link set veth0 mtu 1500
OM_VERBS_TEST_SMALL_PATH=1 OM_OMD=/om/omd OM_VERBS_TEST_ADDR=10.0.0.2 verbs-tests --ignored \
  on_demand_windows_refuse_a_path_too_small_for_them
/sbin/ip link set veth0 mtu 9000

step "live migration over rxe, every registration on demand: threads, 10.0.0.1 -> 10.0.0.2 -> 10.0.0.1"
export OM_VERBS_ODP=on
start_omds
threads_there_and_back 400
# The log colours its fields: match through the escape codes.
grep -q "on_demand[^ ]*true" /tmp/omd2.log || fail "omd did not export on demand"
echo "omd exported on demand"

# The benchmarks only when asked (OM_RXE_BENCH_ODP=1): the figure comes from the 6.1 guest.
[ -n "${OM_RXE_BENCH_ODP:-}" ] || exit 0
step "benchmark: om over rxe / ib_write_bw, both on demand"
verbs --mib ${OM_RXE_BENCH_MIB:-32} --runs ${OM_RXE_BENCH_RUNS:-1} --odp
if [ -n "${OM_RXE_BENCH_PINNED:-}" ]; then
  step "benchmark: om over rxe / ib_write_bw, both pinned, on this kernel and MTU"
  verbs --mib ${OM_RXE_BENCH_MIB:-32} --runs ${OM_RXE_BENCH_RUNS:-1}
fi
