# Runs inside the soft-RoCE guest (ci/rxe/guest.sh): om's binaries are in /om, rxe0 has 10.0.0.1 and
# rxe1 10.0.0.2. Fails on the first failing step.
set -e
. /om/common.sh

step "verbs transport tests (page-server/tests/verbs.rs)"
OM_OMD=/om/omd OM_VERBS_TEST_ADDR=10.0.0.2 verbs-tests --ignored --test-threads=1

step "live migration over rxe: threads, 10.0.0.1 -> 10.0.0.2 -> 10.0.0.1"
start_omds
threads_there_and_back 1200

step "every page stamped in turn, a page every 250 us: no write lost to a soft-dirty round (TCP)"
# This guest's 6.1 kernel has soft-dirty bits and no PAGEMAP_SCAN: its rounds read the bits and
# clear them in two steps, which must not race with the program (lib/src/precopy/migrate.rs).
laps 5 > /tmp/plain.out
omrun --control /tmp/omd1.sock -- laps 5 > /tmp/moved.out &
omrun=$!
sleep 2
pid=$(cat /proc/$omrun/task/$omrun/children | tr -d ' ')
omctl --control /tmp/omd1.sock migrate "$pid" --to 10.0.0.2:7070 --max-rounds 4 --json || fail "migrate laps"
wait $omrun || { st=$?; cat /tmp/moved.out; fail "laps: omrun exit status $st"; }
cmp /tmp/plain.out /tmp/moved.out || fail "laps: output differs from the uninterrupted run"
echo "no write lost ($(wc -l < /tmp/plain.out) lines)"

step "copies in a private file mapping dropped again read as the file after a move (TCP)"
filecow 7 /tmp/fc-plain.data > /tmp/plain.out
omrun --control /tmp/omd1.sock -- filecow 7 /tmp/fc-moved.data > /tmp/moved.out &
omrun=$!
sleep 2
pid=$(cat /proc/$omrun/task/$omrun/children | tr -d ' ')
omctl --control /tmp/omd1.sock migrate "$pid" --to 10.0.0.2:7070 --max-rounds 4 || fail "migrate filecow"
wait $omrun || { st=$?; cat /tmp/moved.out; fail "filecow: omrun exit status $st"; }
cmp /tmp/plain.out /tmp/moved.out || fail "filecow: output differs from the uninterrupted run"
echo "dropped copies read as the file"

step "a numbered line every millisecond: a destination that dies in round 1, then a move over rxe"
# omd on 10.0.0.2:7071 crashes in round 1 of every image (OM_FAULT): the migration fails and the
# program runs on at home; the next migration, to the healthy omd, goes through.
OM_FAULT=round:1 omd --listen 10.0.0.2:7071 --key /tmp/key --control /tmp/omd3.sock \
  --state-dir /tmp/state3 >/tmp/omd3.log 2>&1 &
seq 0 9999 > /tmp/plain.out
omrun --control /tmp/omd1.sock -- numbered 10000 > /tmp/moved.out &
omrun=$!
sleep 1
pid=$(cat /proc/$omrun/task/$omrun/children | tr -d ' ')
if omctl --control /tmp/omd1.sock migrate "$pid" --to 10.0.0.2:7071 --transport verbs 2>/tmp/err; then
  fail "a migration to a crashing omd succeeded"
fi
grep -q "continues here" /tmp/err || { cat /tmp/err; fail "no clear error from the failed migration"; }
echo "failed as it should: $(cut -c1-160 /tmp/err)"
omctl --control /tmp/omd1.sock migrate "$pid" --to 10.0.0.2:7070 --transport verbs --max-rounds 3 || fail "migrate numbered"
wait $omrun || fail "omrun exit status $?"
cmp /tmp/plain.out /tmp/moved.out || fail "lines lost or repeated"
echo "no line lost or repeated"

step "the C launcher (examples/c/launcher.c) migrates a program over verbs"
seq 0 5999 > /tmp/plain.out
OM_TRANSPORT=verbs OM_BIN_DIR=/om launcher /tmp/omd1.sock 10.0.0.2:7070 1500 numbered 6000 \
  > /tmp/moved.out 2>/tmp/launcher.err || { cat /tmp/launcher.err; fail "the C launcher"; }
grep "launcher: moved to" /tmp/launcher.err || { cat /tmp/launcher.err; fail "the C launcher did not move it"; }
cmp /tmp/plain.out /tmp/moved.out || fail "the C launcher's program lost or repeated lines"

step "benchmark: om over rxe / ib_write_bw"
verbs --mib ${OM_RXE_BENCH_MIB:-32} --runs ${OM_RXE_BENCH_RUNS:-1}
