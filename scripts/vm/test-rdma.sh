#!/usr/bin/env bash
# Runs the rdma plugin's tests on a real kernel verbs stack: boots the soft-RoCE guest
# (run-in-rxe-guest.sh, two rxe devices) and runs the already-built test binary's
# "rdma plugin over soft-RoCE" suite inside it. Build first: swift build --build-tests.
#   scripts/vm/test-rdma.sh            # about 1-2 minutes (software emulation)
# Exit code: the tests' (125: the guest could not be set up).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/vm/guest-suite.sh
guest_test_binary libtransport_rdma.so "install libibverbs-dev"
trap 'rm -f "${guest_log:-}"' EXIT
# The conformance suite runs its rdma case here (CONFORMANCE_ONLY); its other cases run on the host.
RXE_VM_DEVICES=2 run_guest_suite "rdma plugin over soft-RoCE (in the guest)" -t "${TE_RDMA_TEST_TIMEOUT:-900}" -- \
    env CONFORMANCE_ONLY=rdma "$tests" --testing-library swift-testing --filter "RDMAGuestTests|ConformanceTests"
if [ "$rc" = 0 ] && ! grep -q 'Suite "Transport conformance" passed' "$guest_log"; then
    echo "error: the conformance suite's rdma case did not run in the guest" >&2
    rc=1
fi
if grep -q "skipped" "$guest_log" && grep -q 'two soft-RoCE devices.*skipped' "$guest_log"; then
    echo "error: the two-device test was skipped" >&2
    rc=1
fi
exit "$rc"
