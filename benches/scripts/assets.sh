#!/usr/bin/env bash
# Assets over the network: per round a fresh development server (embedded
# config, its own data directory, [::1]:4433) and one `internet2
# asset-bench` against it (memory allocations, 4 KiB reads beside a ping,
# bulk reads, durable storage allocations and 4 KiB storage reads). Prints
# each round and the medians. Usage: benches/scripts/assets.sh [ROUNDS]
set -euo pipefail
rounds=${1:-3}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=$root/target/release
cargo build --release -q -p internet2-server --manifest-path "$root/Cargo.toml"
work=$(mktemp -d /tmp/i2-assets-bench.XXXXXX)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
# A fresh development server on data directory $1, logging to $2; sets
# $server once it listens.
start_server() {
    mkdir -p "$1"
    "$bin/internet2-server" --data-dir "$1" >"$2" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
        grep -q listening "$2" && break
        sleep 0.1
    done
}
for round in $(seq 1 "$rounds"); do
    data=$work/data$round
    start_server "$data" "$work/server$round.log"
    "$bin/internet2" asset-bench --ca "$data/ca.pem" --timeout-ms 20000 \
        --json "$work/round$round.json" >/dev/null 2>"$work/bench$round.log" \
        || { cat "$work/bench$round.log" "$work/server$round.log"; exit 1; }
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=
    python3 - "$work/round$round.json" "$round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["storage"]
print(f"round {sys.argv[2]}: memory allocs/s {r['allocs']['per_second']:.0f}, "
      f"storage allocs/s {s['allocs']['per_second']:.0f} (durable), "
      f"4 KiB read p50/p99 us: memory {r['read_4k']['latency_us_p50']}/{r['read_4k']['latency_us_p99']}, "
      f"storage {s['read_4k']['latency_us_p50']}/{s['read_4k']['latency_us_p99']}, "
      f"ping {r['ping_1k']['latency_us_p50']}/{r['ping_1k']['latency_us_p99']}; "
      f"bulk {r['bulk_read']['gbps']:.2f} Gbit/s")
PY
done
python3 - "$work" "$rounds" <<'PY'
import json, statistics, sys
rs = [json.load(open(f"{sys.argv[1]}/round{i}.json")) for i in range(1, int(sys.argv[2]) + 1)]
m = lambda f: statistics.median(f(r) for r in rs)
mem = m(lambda r: r["allocs"]["per_second"])
sto = m(lambda r: r["storage"]["allocs"]["per_second"])
print(f"medians: memory allocs/s {mem:.0f}, storage allocs/s {sto:.0f} "
      f"(storage/memory {sto / mem:.3f}), storage 4 KiB read p99 "
      f"{m(lambda r: r['storage']['read_4k']['latency_us_p99'])} us, memory "
      f"{m(lambda r: r['read_4k']['latency_us_p99'])} us, ping "
      f"{m(lambda r: r['ping_1k']['latency_us_p99'])} us")
PY

# Bulk: a 1 GiB memory asset read 16 MiB per request (4 in flight) on one
# connection, beside a 5 s perf download, each against the same fresh
# server in each round; server CPU (utime + stime of its process) sampled
# around each, reported per Gbit moved (= server cores per Gbit/s).
cpu_s() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }
for round in $(seq 1 "$rounds"); do
    data=$work/bulk$round
    start_server "$data" "$work/bulk-server$round.log"
    "$bin/internet2-server" --data-dir "$data" quota set --cert "$data/operator.pem" \
        --memory 2G >/dev/null
    before=$(cpu_s "$server")
    "$bin/internet2" asset-bench --ca "$data/ca.pem" --timeout-ms 20000 \
        --allocs 1 --reads 1 --storage-allocs 0 --bulk-mib 1024 --bulk-total-mib 8192 \
        --json "$work/bulk$round.json" >/dev/null 2>"$work/bulk-bench$round.log" \
        || { cat "$work/bulk-bench$round.log"; exit 1; }
    middle=$(cpu_s "$server")
    "$bin/internet2" bench --ca "$data/ca.pem" --duration 5 \
        --json "$work/perf$round.json" >/dev/null 2>&1
    after=$(cpu_s "$server")
    kill "$server"
    wait "$server" 2>/dev/null || true
    server=
    python3 - "$work" "$round" "$before" "$middle" "$after" <<'PY'
import json, sys
work, r, before, middle, after = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
bulk = json.load(open(f"{work}/bulk{r}.json"))["bulk_read"]
perf = json.load(open(f"{work}/perf{r}.json"))
gbit_bulk = bulk["requests"] * bulk["request_bytes"] * 8 / 1e9
gbit_perf = perf["goodput_gbps"] * perf["duration_s"]
print(f"bulk round {r}: asset {bulk['gbps']:.2f} Gbit/s, {(middle - before) / gbit_bulk:.3f} server CPU-s per Gbit "
      f"(the 1 GiB allocation included); perf {perf['goodput_gbps']:.2f} Gbit/s, "
      f"{(after - middle) / gbit_perf:.3f} CPU-s per Gbit")
PY
done
