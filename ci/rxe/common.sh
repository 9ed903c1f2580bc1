# What the guests' jobs share (ci/rxe/job.sh, ci/rxe/job-odp.sh source it as /om/common.sh).
start=$(date +%s)
step() { echo; echo "== $* (at $(($(date +%s) - start)) s)"; }
fail() { echo "FAILED: $*"; tail -20 /tmp/omd1.log /tmp/omd2.log 2>/dev/null; exit 1; }

# omd on 10.0.0.1:7070 and 10.0.0.2:7070, with a fresh cluster key (/tmp/key).
start_omds() {
  head -c 32 /dev/urandom > /tmp/key && chmod 600 /tmp/key
  for n in 1 2; do
    omd --listen 10.0.0.$n:7070 --key /tmp/key --control /tmp/omd$n.sock --state-dir /tmp/state$n \
      >/tmp/omd$n.log 2>&1 &
  done
}

# threads.c with N rounds under omrun on node 1, moved to node 2 and back over verbs; its output
# must be that of the uninterrupted run made on the host (/om/threads-N.out).
threads_there_and_back() {
  n=$1
  cat /om/threads-$n.out > /tmp/plain.out
  omrun --control /tmp/omd1.sock -- threads $n > /tmp/moved.out &
  omrun=$!
  sleep 1
  pid=$(cat /proc/$omrun/task/$omrun/children | tr -d ' ')
  out=$(omctl --control /tmp/omd1.sock migrate "$pid" --to 10.0.0.2:7070 --transport verbs --max-rounds 3 --json) || fail "migrate to node 2"
  echo "$out"
  there=$(echo "$out" | sed -n 's/.*"pid_there":\([0-9]*\).*/\1/p')
  sleep 1
  back=$(omctl --control /tmp/omd2.sock migrate "$there" --to 10.0.0.1:7070 --transport verbs --max-rounds 3 --json) || fail "migrate back"
  echo "$back"
  wait $omrun || fail "omrun exit status $?"
  cmp /tmp/plain.out /tmp/moved.out || { diff /tmp/plain.out /tmp/moved.out | head -20; fail "output differs from the uninterrupted run"; }
  echo "output identical ($(wc -l < /tmp/plain.out) lines), two hops over verbs"
}
