#!/usr/bin/env bash
# The main job: build in release mode and run a loopback transfer benchmark between
# two engine processes (TCP, P2PHANDSHAKE), beside reference figures measured in the
# same run, then print every result as a ratio to its reference.
#
#   scripts/bench.sh                  # about two minutes
#   scripts/bench.sh --duration 3     # extra arguments go to `transfer-engine bench`
#
# References: iperf3 single stream; raw libfabric RMA over tcp;ofi_rxm and shm (when
# libfabric-dev and ../shared/reference/probes/fi_rma_probe.c are present), for the TCP
# transport and the efa plugin over those providers; the official Mooncake engine
# (PyPI wheel, installed into .build-interop-venv unless TE_SKIP_OFFICIAL=1).
# Output: tables on stdout, out/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p out
rm -f out/*.json out/*.txt

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    command -v iperf3 >/dev/null || missing+=(iperf3)
    command -v cc >/dev/null || missing+=(gcc libc6-dev)
    command -v python3 >/dev/null || missing+=(python3 python3-venv)
    command -v fio >/dev/null || missing+=(fio)   # the nvmeof guest benchmark's reference
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

echo "== building (release)"
swift build -c release --manifest-cache none 2>&1 | grep -E "error|warning:|Build complete" | tail -3
bin=$(swift build -c release --show-bin-path)/transfer-engine

if command -v iperf3 >/dev/null; then
    echo "== reference: iperf3, one stream over loopback (3 s)"
    iperf3 -s -1 -B 127.0.0.1 -p 15999 >/dev/null 2>&1 &
    sleep 0.5
    iperf3 -c 127.0.0.1 -p 15999 -t 3 -J > out/iperf3.json || true
    wait || true
fi

probe=../shared/reference/probes/fi_rma_probe.c
if [ -f "$probe" ] && [ -f /usr/include/rdma/fabric.h ]; then
    cc -O2 -o out/fi_rma_probe "$probe" -lfabric
    echo "== reference: raw libfabric RMA over tcp;ofi_rxm, 64 operations in flight, 8 MiB buffer"
    timeout 120 out/fi_rma_probe bw 'tcp;ofi_rxm' efa | tee out/fi_rma_probe.txt || true
    echo "== reference: raw libfabric RMA over shm, 64 operations in flight, 8 MiB buffer"
    timeout 120 out/fi_rma_probe bw shm efa | tee out/fi_rma_probe-shm.txt || true
fi

venv=.build-interop-venv
if [ "${TE_SKIP_OFFICIAL:-0}" != 1 ]; then
    if ! "$venv/bin/python" -c "import mooncake.engine" 2>/dev/null; then
        echo "== installing the official engine (mooncake-transfer-engine-non-cuda) for a reference"
        python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "mooncake-transfer-engine-non-cuda==0.3.13.post1" || true
    fi
    if "$venv/bin/python" -c "import mooncake.engine" 2>/dev/null; then
        echo "== reference: the official Mooncake engine, TCP, official initiator and target"
        timeout 300 "$venv/bin/python" scripts/official_bench.py --duration 2 2>/dev/null | tee out/official.txt | grep -v '^{' || true
        grep '^{' out/official.txt > out/official.json || rm -f out/official.json
    fi
fi

echo "== transfer-engine bench --loopback"
"$bin" bench --loopback --json out/bench.json "$@"
echo "== transfer-engine bench --loopback, 8 MiB working set (the libfabric probe's buffer size)"
"$bin" bench --loopback --json out/bench-ws8.json --working-set 8MiB --block-sizes 4KiB,64KiB,1MiB,4MiB --batch-sizes 64 --no-reference "$@"

echo "== transfer-engine bench --loopback --protocol shm (same-host plugin), with memcpy as the ceiling"
"$bin" bench --loopback --protocol shm --json out/bench-shm.json --memcpy-reference --no-reference \
    --block-sizes 4KiB,64KiB,1MiB,64MiB --batch-sizes 1,64 "$@" || echo "(shm plugin unavailable)"

if [ -f "$(dirname "$bin")/libtransport_efa.so" ]; then
    for provider in 'tcp;ofi_rxm' shm; do
        tag=${provider%%;*}
        echo "== transfer-engine bench --loopback --protocol efa over libfabric $provider (the probe's sizes, 64 in flight, 8 MiB working set)"
        MC_EFA_PROVIDER=$provider "$bin" bench --loopback --protocol efa --json "out/bench-efa-$tag.json" --working-set 8MiB \
            --block-sizes 4KiB,64KiB,1MiB,4MiB --batch-sizes 64 --no-reference "$@" || echo "(efa over $provider unavailable)"
    done
fi

if [ "$(id -u)" = 0 ] && [ -f "$(dirname "$bin")/libtransport_rdma.so" ] && [ "${TE_SKIP_VM:-0}" != 1 ]; then
    echo "== rdma in the soft-RoCE guest: perftest and transfer-engine bench in the same boot (TE_SKIP_VM=1 skips)"
    TE_BIN=$(dirname "$bin") scripts/vm/run-in-rxe-guest.sh -t 600 --script scripts/vm/rdma-bench.sh | grep -v '^\[rxe-vm' || echo "(rdma guest benchmark failed)"
fi

if [ "$(id -u)" = 0 ] && [ -f "$(dirname "$bin")/libtransport_cxl.so" ] && [ "${TE_SKIP_VM:-0}" != 1 ]; then
    echo "== cxl on QEMU's emulated CXL device: memcpy on /dev/dax0.0 and transfer-engine bench in the same boot"
    TE_BIN=$(dirname "$bin") scripts/vm/cxl-bench.sh || echo "(cxl guest benchmark failed)"
fi

if [ "$(id -u)" = 0 ] && [ -f "$(dirname "$bin")/libtransport_nvmeof.so" ] && [ "${TE_SKIP_VM:-0}" != 1 ]; then
    echo "== nvmeof on a kernel NVMe/RDMA target over rxe in the guest: fio and transfer-engine bench on the same namespace, same boot"
    TE_BIN=$(dirname "$bin") scripts/vm/nvmeof-bench.sh || echo "(nvmeof guest benchmark failed)"
fi

echo "== summary"
python3 scripts/bench_summary.py out
