#!/usr/bin/env bash
# The main job: build in release mode and run a loopback transfer benchmark between
# two engine processes (TCP, P2PHANDSHAKE), next to reference figures measured in
# the same run. Results: a table on stdout and out/bench.json.
#
#   scripts/bench.sh                  # default sweep (about a minute)
#   scripts/bench.sh --duration 3     # extra arguments go to `transfer-engine bench`
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

echo "== building (release)"
swift build -c release --manifest-cache none 2>&1 | grep -E "error|warning:|Compiling|Build complete" | tail -3
bin=$(swift build -c release --show-bin-path)/transfer-engine

if command -v iperf3 >/dev/null; then
    echo "== reference: iperf3 single stream over loopback (3 s)"
    iperf3 -s -1 -B 127.0.0.1 -p 15999 >/dev/null 2>&1 &
    sleep 0.5
    iperf3 -c 127.0.0.1 -p 15999 -t 3 -f g | grep -E "sender|receiver" | tee out/iperf3.txt
    wait || true
fi

probe=../shared/reference/probes/fi_rma_probe.c
if [ -f "$probe" ] && [ -f /usr/include/rdma/fabric.h ]; then
    echo "== reference: libfabric tcp;ofi_rxm RMA bandwidth (64 operations in flight)"
    cc -O2 -o out/fi_rma_probe "$probe" -lfabric && timeout 60 out/fi_rma_probe bw 'tcp;ofi_rxm' efa | tee out/fi_rma_probe.txt || true
fi

echo "== transfer-engine bench --loopback"
"$bin" bench --loopback --json out/bench.json "$@"
