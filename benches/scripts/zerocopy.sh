#!/bin/bash
# Zero-copy UDP send over a veth pair (the realistic path; the loopback
# one needs no script: zerocopy-micro --label loopback). Two namespaces,
# i2z-a (sender, fd71:7e57:9::1) and i2z-b (receiver, fd71:7e57:9::2),
# joined by a veth pair created inside them: the host's own interfaces
# are never touched. Needs root and the release binary (cargo build
# --release -p internet2-benches --bin zerocopy-micro). RUNS, GIB, LIMIT
# (seconds, default 300), JSON (a path), CPU_SEND and CPU_RECV (the CPUs
# the two ends are pinned to, default 0 and 1) set the run; further
# arguments go to the sender (e.g. --modes copy,uring-zc). The namespaces
# and their processes are removed however the script ends.
set -eu
BIN=$(cd "$(dirname "$0")/../.." && pwd)/target/release/zerocopy-micro
SEND=i2z-a; RECV=i2z-b; ADDR="[fd71:7e57:9::2]:5300"; LIMIT=${LIMIT:-300}
D=
cleanup() {
  for ns in $SEND $RECV; do
    ip netns pids $ns 2>/dev/null | xargs -r kill -9 || true
    ip netns del $ns 2>/dev/null || true
  done
  [ -z "$D" ] || rm -rf "$D"
}
trap cleanup EXIT
cleanup # what an earlier run left behind, if it was killed hard
D=$(mktemp -d /tmp/i2z-XXXX)
[ -x "$BIN" ] || { echo "no $BIN: build it first" >&2; exit 1; }
for ns in $SEND $RECV; do
  ip netns add $ns
  ip netns exec $ns sh -c 'echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad; echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad'
  ip -n $ns link set lo up
done
ip link add i2z-va netns $SEND type veth peer name i2z-vb netns $RECV
ip -n $SEND addr add fd71:7e57:9::1/64 dev i2z-va nodad
ip -n $RECV addr add fd71:7e57:9::2/64 dev i2z-vb nodad
ip -n $SEND link set i2z-va up; ip -n $RECV link set i2z-vb up
ip netns exec $RECV timeout $LIMIT "$BIN" --role recv --listen "$ADDR" --cpu-recv "${CPU_RECV:-1}" --time-limit-s $((LIMIT - 10)) 2> "$D/recv.err" &
RP=$!
for _ in $(seq 1 50); do grep -q "listening" "$D/recv.err" 2>/dev/null && break; sleep 0.1; done
grep -q "listening" "$D/recv.err" || { echo "receiver did not start:" >&2; cat "$D/recv.err" >&2; exit 1; }
rc=0
ip netns exec $SEND timeout $((LIMIT - 20)) "$BIN" --role send --connect "$ADDR" --label veth --cpu-send "${CPU_SEND:-0}" \
  --runs "${RUNS:-5}" --gib "${GIB:-4}" ${JSON:+--json "$JSON"} "$@" || rc=$?
# A sender that failed before its control connection leaves the receiver
# waiting in accept: stop it rather than wait out its time limit.
[ $rc -eq 0 ] || kill $RP 2>/dev/null || true
wait $RP || { r=$?; [ $rc -ne 0 ] || rc=$r; }
cat "$D/recv.err" >&2
exit $rc
