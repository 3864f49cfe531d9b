#!/usr/bin/env bash
# The ascend plugin's device check, for a host with Huawei NPUs and CANN 8.5.0 or newer with HIXL
# (source CANN's set_env.sh first, so libascendcl.so and libcann_hixl.so are on LD_LIBRARY_PATH).
# It prints, in order:
#   1. the NPUs (npu-smi info) and the address of each in /etc/hccn.conf;
#   2. the plugin's probe answer (`transfer-engine plugins`);
#   3. the conformance checks (`transfer-engine plugins --check`: 24 checks, two engines in two
#      processes on this host, npu:0 HIXL server and client);
#   4. correctness: host memory here <-> npu:0 memory of a second engine process, 4 KiB .. 64 MiB
#      written and read back through HIXL, verified;
#   5. speed: npu:0 <-> npu:0 between the two processes (`transfer-engine bench` rows, JSON in out/).
# Usage: scripts/device/ascend-check.sh [bin-dir]   (default: swift build -c release, then its bin path)
# Set MC_ASCEND_DEVICE_IP when hccn.conf has no address (RoCE); on one host the link is HCCS.
# Runs only on this host (both engines on 127.0.0.1). Exits non-zero when a check fails.
set -uo pipefail
source "$(dirname "$0")/common.sh"
echo "== NPUs"
command -v npu-smi >/dev/null && npu-smi info | head -30
[ -r /etc/hccn.conf ] && grep -E "^(IPv6)?address_" /etc/hccn.conf
echo "== probe"
"$bin/transfer-engine" plugins | grep -E "^(protocol|ascend) "
status=$(plugin_status ascend)
[ "$status" = available ] || { echo "ascend: $status: nothing more to check here"; exit 1; }
rc=0
echo "== conformance checks"
timeout 600 "$bin/transfer-engine" plugins --check "$bin/libtransport_ascend.so" > out/ascend-check.txt 2>&1 || rc=1
tail -26 out/ascend-check.txt
echo "== host memory <-> npu:0 of a second process, 4 KiB .. 64 MiB, verified"
timeout 300 "$bin/transfer-engine" bench --loopback --protocol ascend --location npu:0 --local-heap --verify \
    --buffer-size 256MiB --block-sizes 4KiB,64KiB,1MiB,16MiB,64MiB --batch-sizes 1 --duration 0.5 --no-reference \
    --json out/ascend-verify.json || { echo "ascend: verification FAILED"; rc=1; }
echo "== npu:0 <-> npu:0 between two processes"
timeout 300 "$bin/transfer-engine" bench --loopback --protocol ascend --location npu:0 \
    --buffer-size 1GiB --block-sizes 4KiB,1MiB,64MiB --batch-sizes 1,16 --duration 2 --no-reference \
    --json out/ascend.json || { echo "ascend: benchmark FAILED"; rc=1; }
exit $rc
