#!/usr/bin/env bash
# The verbs transport on soft-RoCE: builds om, the verbs tests and the verbs benchmark, boots the rxe
# guest (ci/rxe/guest.sh) and runs ci/rxe/job.sh inside it: the verbs transport tests, a live
# migration of a real program between rxe0 and rxe1 and back, and the benchmark against ib_write_bw;
# then the same with on-demand paging in a guest whose kernel offers it (ci/rxe/job-odp.sh).
#
#   bash ci/rxe/run.sh            # debug build (what CI runs)
#   OM_RXE_PROFILE=release bash ci/rxe/run.sh   # the benchmark's recorded figures
#   OM_RXE_JOB=my-job.sh bash ci/rxe/run.sh      # another job script, one guest (OM_RXE_KERNEL picks it)
#
# Two guests run in turn: Debian 12's 6.1 kernel with ci/rxe/job.sh, then the newest kernel of
# Debian 13's backports, whose rxe offers on-demand paging, with ci/rxe/job-odp.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=${OM_RXE_PROFILE:-debug}
flag=()
[ "$profile" = release ] && flag=(--release)

cargo build --locked "${flag[@]}" -p om-cli -p om-page-server -p om-restore -p om-benches --bins
cargo build --locked "${flag[@]}" -p om-runtime --lib
# The test binary of page-server/tests/verbs.rs, by its path from cargo.
tests=$(cargo test --locked "${flag[@]}" -p om-page-server --test verbs --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "verbs":
        print(m["executable"])')
[ -x "$tests" ] || { echo "run.sh: no verbs test binary" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/om-rxe-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cp "$tests" "$work/verbs-tests"
gcc -O2 -pthread -o "$work/threads" lib/restore/tests/workloads/threads.c
gcc -O2 -o "$work/numbered" lib/restore/tests/workloads/numbered.c
gcc -O2 -o "$work/laps" lib/restore/tests/workloads/laps.c
gcc -O2 -o "$work/filecow" lib/restore/tests/workloads/filecow.c
# The uninterrupted runs the guests compare with, made here (the emulated CPU is several times
# slower): threads.c's output depends only on its argument.
"$work/threads" 1200 >"$work/threads-1200.out"
"$work/threads" 400 >"$work/threads-400.out"
cargo build --locked "${flag[@]}" -p om-launch --lib
gcc -Wall -Werror -O2 -I lib/launch/include -o "$work/launcher" examples/c/launcher.c \
  -L"target/$profile" -lom_launch -Wl,-rpath,/om
bin=target/$profile
files=("$bin/omd" "$bin/omrun" "$bin/omctl" "$bin/om-restore" "$bin/libomrt.so" "$bin/verbs"
  "$bin/libom_launch.so" "$work/verbs-tests" "$work/threads" "$work/numbered" "$work/laps" "$work/filecow" "$work/launcher"
  "$work/threads-1200.out" "$work/threads-400.out" ci/rxe/common.sh)
if [ -n "${OM_RXE_JOB:-}" ]; then
  exec bash ci/rxe/guest.sh "$OM_RXE_JOB" "${files[@]}"
fi
# Debian 12's 6.1 kernel: rxe without on-demand paging, soft-dirty rounds.
SECONDS=0
bash ci/rxe/guest.sh ci/rxe/job.sh "${files[@]}"
echo "== the 6.1 guest took ${SECONDS} s"
# The newest kernel of Debian 13's backports: rxe with on-demand paging, userfaultfd rounds.
SECONDS=0
OM_RXE_KERNEL=odp bash ci/rxe/guest.sh ci/rxe/job-odp.sh "${files[@]}"
echo "== the ODP guest took ${SECONDS} s"
