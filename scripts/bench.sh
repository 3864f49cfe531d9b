#!/usr/bin/env bash
# The main job: build in release mode and run a loopback transfer benchmark between
# two engine processes (TCP, P2PHANDSHAKE), beside reference figures measured in the
# same run, then print every result as a ratio to its reference.
#
#   scripts/bench.sh                  # about ten minutes with the guests (root), two without
#   scripts/bench.sh --quick          # every case once, briefly (CI runs this before the tests)
#   scripts/bench.sh --duration 3     # extra arguments go to `transfer-engine bench`
#   TE_BACKGROUND_LOAD=0 scripts/bench.sh   # quiet figures only (default: also beside 1 busy thread)
#
# References: iperf3 single stream; raw libfabric RMA over tcp;ofi_rxm and shm (when
# libfabric-dev and ../shared/reference/probes/fi_rma_probe.c are present), for the TCP
# transport (in 2-3 alternating rounds, each compared on its own) and the efa plugin over
# those providers; the official Mooncake engine
# (PyPI wheel, installed into .build-interop-venv unless TE_SKIP_OFFICIAL=1).
# Output: tables on stdout, out/*.json, out/transports.txt (which transports ran, and why the
# others did not), which the summary prints, and a chart of it all, out/bench.png and .svg.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
args=()
for a in "$@"; do
    if [ "$a" = --quick ]; then quick=1; else args+=("$a"); fi
done
set -- ${args[@]+"${args[@]}"}
mkdir -p out
rm -f out/*.json out/*.txt
# Quick mode: every case, each briefly (seconds per case for bench, perftest and fio iterations).
if [ $quick = 1 ]; then
    export TE_DURATION=0.3 TE_QUICK=1 TE_FIO_SECONDS=1 RXE_VM_ENV="${RXE_VM_ENV:-} TE_DURATION TE_QUICK TE_FIO_SECONDS"
    set -- --duration 0.3 "$@"
fi
iperf_seconds=$([ $quick = 1 ] && echo 1 || echo 3)
# Busy threads beside the tcp benchmark's loaded pass and the official engine's (TE_BACKGROUND_LOAD; 0: quiet only).
load=${TE_BACKGROUND_LOAD:-1}
official_seconds=$([ $quick = 1 ] && echo 0.3 || echo 2)

# Which transports ran (and why the others did not), for the summary.
status() { echo "$1|$2" >> out/transports.txt; }

scripts/setup.sh

echo "== building (release)"
swift build -c release --manifest-cache none 2>&1 | grep -E "error|warning:|Build complete" | tail -3
bin=$(swift build -c release --show-bin-path)/transfer-engine
built() { [ -f "$(dirname "$bin")/libtransport_$1.so" ]; }

if command -v iperf3 >/dev/null; then
    echo "== reference: iperf3, one stream over loopback ($iperf_seconds s)"
    iperf3 -s -1 -B 127.0.0.1 -p 15999 >/dev/null 2>&1 &
    sleep 0.5
    iperf3 -c 127.0.0.1 -p 15999 -t "$iperf_seconds" -J > out/iperf3.json || true
    wait || true
fi

probe=../shared/reference/probes/fi_rma_probe.c
have_probe=0
if [ -f "$probe" ] && [ -f /usr/include/rdma/fabric.h ]; then
    rm -f out/fi_rma_probe
    cc -O2 -o out/fi_rma_probe "$probe" -lfabric && have_probe=1 || echo "(the libfabric probe did not build: no libfabric references)"
fi
if [ $have_probe = 1 ]; then
    echo "== reference: raw libfabric RMA over shm, 64 operations in flight, 8 MiB buffer"
    timeout 120 out/fi_rma_probe bw shm efa | tee out/fi_rma_probe-shm.txt || true
fi
# Rounds of the tcp transport against raw libfabric tcp;ofi_rxm (the probe, then ours, adjacent),
# each round compared on its own.
probe_rounds=$([ $quick = 1 ] && echo 2 || echo 3)

venv=.build-interop-venv
if [ "${TE_SKIP_OFFICIAL:-0}" != 1 ]; then
    if ! "$venv/bin/python" -c "import mooncake.engine" 2>/dev/null; then
        echo "== installing the official engine (mooncake-transfer-engine-non-cuda) for a reference"
        python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "mooncake-transfer-engine-non-cuda==0.3.13.post1" || true
    fi
    if "$venv/bin/python" -c "import mooncake.engine" 2>/dev/null; then
        echo "== reference: the official Mooncake engine, TCP, official initiator and target, every case of the tcp run below, quiet and beside $load busy thread(s)"
        timeout 900 "$venv/bin/python" scripts/official_bench.py --duration "$official_seconds" --background-load "$load" --load-bin "$bin" 2>/dev/null \
            | tee out/official.txt | grep -v '^{' || true
        grep '^{' out/official.txt > out/official.json || rm -f out/official.json
        # The first operation to a new peer is one cold sample per process, and either engine's
        # swings by 2-5x from one process to the next: fresh processes of each, alternating.
        first_rounds=$([ $quick = 1 ] && echo 5 || echo 9)
        echo "== first operation to a new peer: $first_rounds fresh processes of each engine, alternating"
        : > out/first-op.txt
        for round in $(seq 1 "$first_rounds"); do
            o=$(timeout 60 "$venv/bin/python" scripts/official_bench.py --duration 0.02 --block-sizes 4096 --batch-sizes 1 2>/dev/null |
                sed -n 's/.*first operation to a new peer: \([0-9.]*\) us.*/\1/p' | head -1)
            u=$(timeout 60 "$bin" bench --loopback --no-reference --block-sizes 4KiB --batch-sizes 1 --duration 0.02 2>/dev/null |
                sed -n 's/.*first operation to the new peer: \([0-9.]*\) us.*/\1/p' | head -1)
            [ -n "$o" ] && [ -n "$u" ] && echo "round $round official $o ours $u" | tee -a out/first-op.txt
        done
    fi
fi

echo "== transfer-engine bench --loopback, quiet and beside $load busy thread(s) (a neighbour on the same cores)"
"$bin" bench --loopback --json out/bench.json --background-load "$load" "$@"
status tcp "ran"
tcp_probe() {  # file: raw libfabric RMA over tcp;ofi_rxm
    [ $have_probe = 1 ] || return 0
    echo "== reference: raw libfabric RMA over tcp;ofi_rxm, 64 operations in flight, 8 MiB buffer"
    timeout 120 out/fi_rma_probe bw 'tcp;ofi_rxm' efa | tee "$1" || true
}
tcp_probe out/fi_rma_probe.txt
echo "== transfer-engine bench --loopback, 8 MiB working set (the libfabric probe's buffer size), round 1 of $probe_rounds"
"$bin" bench --loopback --json out/bench-ws8.json --working-set 8MiB --block-sizes 4KiB,64KiB,1MiB,4MiB --batch-sizes 64 --no-reference "$@" ||
    echo "(round 1 failed; the summary leaves it out)"
for round in $(seq 2 "$probe_rounds"); do
    [ $have_probe = 1 ] || break
    tcp_probe "out/fi_rma_probe-round$round.txt"
    echo "== transfer-engine bench --loopback, 8 MiB working set, 1 and 4 MiB x64, round $round of $probe_rounds"
    "$bin" bench --loopback --json "out/bench-ws8-round$round.json" --working-set 8MiB --block-sizes 1MiB,4MiB --batch-sizes 64 --no-reference "$@" ||
        echo "(round $round failed; the summary leaves it out)"
done

echo "== transfer-engine bench --loopback --protocol shm (same-host plugin), with a memory-copy ceiling (memcpy or cache-bypassing copy, the better, as many threads as the plugin copies with)"
"$bin" bench --loopback --protocol shm --json out/bench-shm.json --memcpy-reference --memcpy-threads "${MC_SHM_WORKERS:-2}" --no-reference \
    --block-sizes 4KiB,64KiB,1MiB,64MiB --batch-sizes 1,64 "$@" && status shm "ran" || { echo "(shm plugin unavailable)"; status shm "failed (see the log above)"; }

if [ -f "$(dirname "$bin")/libtransport_efa.so" ]; then
    for provider in 'tcp;ofi_rxm' shm; do
        tag=${provider%%;*}
        echo "== transfer-engine bench --loopback --protocol efa over libfabric $provider (the probe's sizes, 64 in flight, 8 MiB working set)"
        MC_EFA_PROVIDER=$provider "$bin" bench --loopback --protocol efa --json "out/bench-efa-$tag.json" --working-set 8MiB \
            --block-sizes 4KiB,64KiB,1MiB,4MiB --batch-sizes 64 --no-reference "$@" && status "efa over $provider" "ran" ||
            { echo "(efa over $provider unavailable)"; status "efa over $provider" "failed (see the log above)"; }
    done
else
    status "efa" "not run: libtransport_efa.so was not built (install libfabric-dev, then rebuild)"
fi

# A guest benchmark: runs when its plugin was built, as root, unless TE_SKIP_VM=1; it ran when it
# wrote its JSON.
guest_bench() {  # name plugin json title command...
    local name=$1 plugin=$2 json=$3 title=$4
    shift 4
    if ! built "$plugin"; then status "$name" "not run: libtransport_$plugin.so was not built (install its -dev package; scripts/setup.sh lists it)"; return; fi
    if [ "${TE_SKIP_VM:-0}" = 1 ]; then status "$name" "not run: TE_SKIP_VM=1"; return; fi
    if [ "$(id -u)" != 0 ]; then status "$name" "not run: the QEMU guest needs root"; return; fi
    echo "== $title"
    "$@" || true
    if [ -f "$json" ]; then status "$name" "ran"; else echo "($name guest benchmark failed)"; status "$name" "failed (see the log above)"; fi
}
rdma_guest() { TE_BIN=$(dirname "$bin") scripts/vm/run-in-rxe-guest.sh -t 600 --script scripts/vm/rdma-bench.sh | grep -v '^\[rxe-vm'; }
guest_bench "rdma (soft-RoCE guest)" rdma out/bench-rdma.json \
    "rdma in the soft-RoCE guest: perftest and transfer-engine bench in the same boot (TE_SKIP_VM=1 skips)" rdma_guest
guest_bench "cxl (emulated CXL device)" cxl out/bench-cxl.json \
    "cxl on QEMU's emulated CXL device: transfer-engine bench with its memcpy ceiling, and memcpy on /dev/dax0.0, in the same boot" \
    env TE_BIN="$(dirname "$bin")" scripts/vm/cxl-bench.sh
guest_bench "nvmeof (NVMe/RDMA guest)" nvmeof out/bench-nvmeof.json \
    "nvmeof on a kernel NVMe/RDMA target over rxe in the guest: fio and transfer-engine bench on the same namespace, same boot" \
    env TE_BIN="$(dirname "$bin")" scripts/vm/nvmeof-bench.sh
for gpu in nvlink nvlink_intra hip; do
    status "$gpu" "not run: no GPU benchmark on this machine (scripts/device/gpu-check.sh runs one where a GPU is)"
done

echo "== summary"
python3 scripts/bench_summary.py out
# Debian's matplotlib is in the system Python (another python3 may come first on PATH).
"$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3 )" scripts/bench_chart.py out
