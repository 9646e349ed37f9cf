#!/bin/bash
# A/B of two pxed builds under perfdhcp's sustained load (userspace DHCP:
# XDP and TC off), interleaved so that drift of the machine hits both alike.
#   bench/scripts/ab-perfdhcp.sh OLD_PXED NEW_PXED [ROUNDS]     (as root)
# Each round runs each build once: fresh namespaces (pxeab-s, pxeab-c) and a
# veth of their own, an empty lease database, perfdhcp -r 20000 for 10 s
# among 10,000 clients as a relay; prints the rate perfdhcp achieved.
# Everything it creates is removed, also on failure.
set -euo pipefail
old=$1 new=$2 rounds=${3:-3}
work=$(mktemp -d)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  ip netns del pxeab-s 2>/dev/null || true
  ip netns del pxeab-c 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

rate() {
  local pxed=$1
  cleanup; work=$(mktemp -d); mkdir -p "$work/root"
  ip netns add pxeab-s; ip netns add pxeab-c
  ip link add pxeab0 type veth peer name pxeab1
  ip link set pxeab0 netns pxeab-s; ip link set pxeab1 netns pxeab-c
  ip -n pxeab-s addr add 198.18.0.1/16 dev pxeab0
  ip -n pxeab-c addr add 198.18.255.254/16 dev pxeab1
  for ns in pxeab-s pxeab-c; do ip -n $ns link set lo up; done
  ip -n pxeab-s link set pxeab0 up; ip -n pxeab-c link set pxeab1 up
  ip netns exec pxeab-s "$pxed" --interface pxeab0 --boot-root "$work/root" \
    --dhcp full --range 198.18.1.0-198.18.63.254 --lease-file "$work/leases.redb" \
    --http-port 0 --xdp-mode off --no-tc > "$work/pxed.log" 2>&1 &
  pid=$!
  sleep 2
  ip netns exec pxeab-c perfdhcp -4 -g single -l 198.18.255.254 -r 20000 -p 10 -R 10000 198.18.0.1 \
    | sed -n 's/^Rate: \([0-9.]*\).*/\1/p'
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
}

for i in $(seq "$rounds"); do
  echo "round $i: old $(rate "$old") new $(rate "$new") DORA/s"
done
