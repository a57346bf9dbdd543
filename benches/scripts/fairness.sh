#!/bin/bash
# Fairness over one bottleneck (issue 16): two upload flows through one
# impair-relay link, one client on bbr2 (BBRv3), one on cubic (the
# uploading client's controller paces its flow), started together.
# Needs root and the release binaries (cargo build --release -p
# internet2-server -p internet2-benches). DELAY (one way, ms), RATE
# (Mbit/s), QUEUE (ms) and DUR (s) set the path and the run; it prints
# each flow's goodput and removes its namespaces however it ends.
set -u
B=$(cd "$(dirname "$0")/../.." && pwd)/target/release
S=i2f-srv-$$; C=i2f-cli-$$; D=$(mktemp -d /tmp/i2f-XXXX)
cleanup() { ip netns pids $S 2>/dev/null | xargs -r kill -9; ip netns pids $C 2>/dev/null | xargs -r kill -9; ip netns del $S 2>/dev/null; ip netns del $C 2>/dev/null; rm -rf $D; }
trap cleanup EXIT
for ns in $S $C; do ip netns add $ns; ip netns exec $ns sh -c 'echo 0 > /proc/sys/net/ipv6/conf/all/accept_dad; echo 0 > /proc/sys/net/ipv6/conf/default/accept_dad'; ip -n $ns link set lo up; done
ip link add i2f-s netns $S type veth peer name i2f-c netns $C
ip -n $S addr add fd71:7e57:0:3::1/64 dev i2f-s nodad; ip -n $C addr add fd71:7e57:0:3::2/64 dev i2f-c nodad
ip -n $S link set i2f-s up; ip -n $C link set i2f-c up
cat > $D/s.toml <<T
[internet2]
bind_address = "fd71:7e57:0:3::1"
port = 4600
[stoq_transport]
congestion_control = "cubic"
[trustchain_authority]
perf_without_client_certificate = true
T
ip netns exec $S $B/internet2-server --config $D/s.toml --data-dir $D/data > $D/server.out 2> $D/server.err &
for i in $(seq 1 100); do grep -q "listening" $D/server.out 2>/dev/null && break; sleep 0.1; done
ip netns exec $C $B/impair-relay --listen "[fd71:7e57:0:3::2]:4600" --upstream "[fd71:7e57:0:3::1]:4600" --delay-ms ${DELAY:-10} --rate-mbit ${RATE:-50} --queue-ms ${QUEUE:-50} --stats $D/relay.json &
RP=$!
sleep 0.5
for cc in bbr2 cubic; do
  ip netns exec $C $B/internet2 bench --connect "[fd71:7e57:0:3::2]:4600" --ca $D/data/ca.pem --server-name localhost --no-chain-check --anonymous \
     --congestion $cc --upload 4194304 --download 1 --duration ${DUR:-30} --quiet --json $D/$cc.json > /dev/null 2> $D/$cc.err &
done
wait $(jobs -p | grep -v $RP | tail -2) 2>/dev/null
sleep 1; kill $RP; wait $RP 2>/dev/null
for cc in bbr2 cubic; do python3 -c "
import json,sys; d=json.load(open('$D/$cc.json')); print('$cc', 'uploaded Mbit/s', round(d['uploaded_bytes']*8/d['duration_s']/1e6,2), 'errors', d['errors'])" 2>/dev/null || { echo "$cc failed"; cat $D/$cc.err | tail -3; }; done
python3 -c "
import json; d=json.load(open('$D/relay.json'))['to_server']
print('bottleneck (to the server): queueing p50', d['queue_ms_p50'], 'ms, p99', d['queue_ms_p99'], 'ms, queue drops', d['dropped_queue'])"
