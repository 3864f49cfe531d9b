#!/usr/bin/env bash
# The GPU plugins' device checks, for a machine with NVIDIA (CUDA 12 driver) or AMD (ROCm/HIP)
# GPUs: which GPU protocols probe as available, then for each available one
#   1. correctness: host memory here <-> GPU memory of a second engine process, every size from
#      4 KiB to 64 MiB written and read back through the peer's IPC (or fabric) mapping, verified;
#   2. speed: GPU <-> GPU between the two processes (`transfer-engine bench` rows, JSON in out/);
# and, where RDMA NICs are up too, GPUDirect RDMA through the rdma plugin the same way.
# Usage: scripts/device/gpu-check.sh [bin-dir]   (default: swift build -c release, then its bin path)
# Runs only on loopback (both engines on this host). Exits non-zero when a check fails.
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "== GPUs"
command -v nvidia-smi >/dev/null && nvidia-smi -L
command -v rocm-smi >/dev/null && rocm-smi --showid 2>/dev/null | head -5
"$bin/transfer-engine" plugins | grep -E "^(protocol|nvlink|nvlink_intra|hip) "
rc=0 ran=0
for protocol in nvlink_intra nvlink hip; do
    status=$(plugin_status $protocol)
    [ "$status" = available ] || { echo "== $protocol: $status (skipped)"; continue; }
    location=cuda:0; [ "$protocol" = hip ] && location=hip:0
    ran=$((ran + 1))
    echo "== $protocol: host memory <-> $location of a second process, 4 KiB .. 64 MiB, verified"
    timeout 300 "$bin/transfer-engine" bench --loopback --protocol "$protocol" --location "$location" --local-heap --verify \
        --buffer-size 256MiB --block-sizes 4KiB,64KiB,1MiB,16MiB,64MiB --batch-sizes 1 --duration 0.5 --no-reference \
        --json "out/gpu-$protocol-verify.json" || { echo "$protocol: verification FAILED"; rc=1; }
    echo "== $protocol: $location <-> $location between two processes"
    timeout 300 "$bin/transfer-engine" bench --loopback --protocol "$protocol" --location "$location" \
        --buffer-size 1GiB --block-sizes 4KiB,1MiB,64MiB --batch-sizes 1,16 --duration 2 --no-reference \
        --json "out/gpu-$protocol.json" || { echo "$protocol: benchmark FAILED"; rc=1; }
done
# GPUDirect RDMA: the rdma plugin on this host's NICs (loopback through the NIC) with the target's
# buffer in GPU memory (cuMemAlloc, registered through nvidia-peermem or a CUDA dma-buf).
status=$(plugin_status rdma)
if [ "$status" = available ] && command -v nvidia-smi >/dev/null; then
    ran=$((ran + 1))
    echo "== rdma (GPUDirect): host memory <-> cuda:0 of a second process over the NIC, verified"
    timeout 300 "$bin/transfer-engine" bench --loopback --protocol rdma --device-name auto-discovery --location cuda:0 --local-heap --verify \
        --buffer-size 256MiB --block-sizes 4KiB,64KiB,1MiB,16MiB,64MiB --batch-sizes 1 --duration 0.5 --no-reference \
        --json out/gpu-rdma-verify.json || { echo "rdma GPUDirect: verification FAILED"; rc=1; }
    timeout 300 "$bin/transfer-engine" bench --loopback --protocol rdma --device-name auto-discovery --location cuda:0 \
        --buffer-size 1GiB --block-sizes 4KiB,1MiB,64MiB --batch-sizes 1,16 --duration 2 --no-reference \
        --json out/gpu-rdma.json || { echo "rdma GPUDirect: benchmark FAILED"; rc=1; }
else
    echo "== rdma (GPUDirect): $status, or no NVIDIA GPU (skipped)"
fi
[ "$ran" -gt 0 ] || { echo "no GPU protocol is available here"; rc=2; }
exit "$rc"
