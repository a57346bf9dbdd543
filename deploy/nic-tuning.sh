#!/usr/bin/env bash
# NIC tuning for internet2-server on bare metal. Run as root:
#   deploy/nic-tuning.sh IFACE QUEUES "CORE_FOR_QUEUE0 CORE_FOR_QUEUE1 ..."
# e.g. deploy/nic-tuning.sh ens1f0 2 "0 8"   (matches deploy/internet2-16core-2queue.toml)
# It sets the queue count, pins each queue's interrupt to its core, turns
# on UDP GRO forwarding and large rings, and prints what it changed.
set -euo pipefail
iface=${1:?usage: $0 IFACE QUEUES \"CORES\"}
queues=${2:?queue count}
read -r -a cores <<<"${3:?one core per queue}"
[ "${#cores[@]}" -eq "$queues" ] || { echo "error: $queues queues need $queues cores, got ${#cores[@]}" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "error: run as root" >&2; exit 2; }
ip link show "$iface" >/dev/null || { echo "error: no interface $iface" >&2; exit 2; }

echo "== $iface: $queues combined queues"
ethtool -L "$iface" combined "$queues" || echo "warning: could not set queue count (driver may not support it)"
echo "== ring sizes to the maximum"
max_rx=$(ethtool -g "$iface" | awk '/Pre-set maximums/{m=1} m && /^RX:/{print $2; exit}')
max_tx=$(ethtool -g "$iface" | awk '/Pre-set maximums/{m=1} m && /^TX:/{print $2; exit}')
[ -n "$max_rx" ] && ethtool -G "$iface" rx "$max_rx" tx "$max_tx" || true
echo "== offloads: GRO, UDP GSO, rx-udp-gro-forwarding"
ethtool -K "$iface" gro on rx-udp-gro-forwarding on tx-udp-segmentation on 2>/dev/null || true
echo "== interrupt affinity (irqbalance must not undo it)"
systemctl stop irqbalance 2>/dev/null || true
i=0
for irq in $(awk -v ifc="$iface" '$0 ~ ifc {sub(":", "", $1); print $1}' /proc/interrupts); do
  core=${cores[$((i % queues))]}
  echo "$core" > "/proc/irq/$irq/smp_affinity_list"
  echo "irq $irq -> core $core"
  i=$((i + 1))
done
echo "done; apply deploy/sysctl-internet2.conf with: sysctl -p deploy/sysctl-internet2.conf"
