#!/usr/bin/env bash
# Runs the rdma plugin's tests on a real kernel verbs stack: boots the soft-RoCE guest
# (run-in-rxe-guest.sh, two rxe devices) and runs the already-built test binary's
# "rdma plugin over soft-RoCE" suite inside it. Build first: swift build --build-tests.
#   scripts/vm/test-rdma.sh            # about 1-2 minutes (software emulation)
# Exit code: the tests' (125: the guest could not be set up).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(swift build --show-bin-path)
tests=$(ls -d "$bin"/*PackageTests.xctest | head -1)
[ -x "$tests" ] || { echo "error: no test binary in $bin (run swift build --build-tests first)" >&2; exit 1; }
[ -f "$bin/libtransport_rdma.so" ] || { echo "error: libtransport_rdma.so was not built (install libibverbs-dev)" >&2; exit 1; }
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
RXE_VM_DEVICES=2 scripts/vm/run-in-rxe-guest.sh -t "${TE_RDMA_TEST_TIMEOUT:-900}" -- \
    "$tests" --testing-library swift-testing --filter RDMAGuestTests 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# Guard against a run that skipped everything (e.g. the devices did not come up).
if [ "$rc" = 0 ] && ! grep -q 'Suite "rdma plugin over soft-RoCE (in the guest)" passed' "$log"; then
    echo "error: the rdma guest suite did not run" >&2
    rc=1
fi
if grep -q "skipped" "$log" && grep -q 'two soft-RoCE devices.*skipped' "$log"; then
    echo "error: the two-device test was skipped" >&2
    rc=1
fi
exit "$rc"
