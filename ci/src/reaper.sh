# omrig reaper: tears a rig down. Arguments: RIG_ID STATE_DIR.
#
# Started by the rig's owner before any namespace exists, in its own process group, with its stdin the
# read end of a pipe that only the owner holds. `read` returns when the owner closes it: on teardown, on
# a panic, or when the owner is killed (even by SIGKILL). Run with stdin at EOF it tears down at once
# (the sweep of rigs whose owner died). Everything of a rig lives in its namespaces, so killing their
# processes and deleting the namespaces removes the veths and the bridge with them.
id=$1
state=$2
read -r _ || true
nss=$(ls /run/netns 2>/dev/null | grep -E "^${id}-(sw|n[0-9]+)\$")
i=0
while [ $i -lt 100 ]; do
  pids=""
  for ns in $nss; do
    pids="$pids $(ip netns pids "$ns" 2>/dev/null)"
  done
  pids=$(echo $pids)
  [ -z "$pids" ] && break
  kill -KILL $pids 2>/dev/null
  sleep 0.05
  i=$((i + 1))
done
status=0
for ns in $nss; do
  # A concurrent sweep may have deleted it already; only a namespace that stays is a failure.
  [ -e "/run/netns/$ns" ] || continue
  ip netns del "$ns" 2>/dev/null || [ ! -e "/run/netns/$ns" ] || status=1
done
case "$state" in
  */omrig-*) rm -rf -- "$state" ;;
esac
[ -n "$pids" ] && { echo "omrig reaper: processes survived SIGKILL in $id: $pids" >&2; status=1; }
exit $status
