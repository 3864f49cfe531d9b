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
inner=$(mktemp -p "$PWD" .rdma-guest.XXXXXX.sh)
trap 'rm -f "$inner" "${guest_log:-}"' EXIT
# Two runs, one after the other: the rdma suite takes rxe0's address away in one test, which
# must not happen under the conformance suite's rdma case (suites of one run go in parallel).
# The conformance suite runs only its rdma case here (CONFORMANCE_ONLY); the rest run on the host.
cat > "$inner" <<INNER
set -u
"$tests" --testing-library swift-testing --filter RDMAGuestTests || exit \$?
CONFORMANCE_ONLY=rdma "$tests" --testing-library swift-testing --filter ConformanceTests
INNER
RXE_VM_DEVICES=2 run_guest_suite "rdma plugin over soft-RoCE (in the guest)" -t "${TE_RDMA_TEST_TIMEOUT:-900}" --script "$inner"
if [ "$rc" = 0 ] && ! grep -q 'Suite "Transport conformance" passed' "$guest_log"; then
    echo "error: the conformance suite's rdma case did not run in the guest" >&2
    rc=1
fi
if grep -q "skipped" "$guest_log" && grep -q 'two soft-RoCE devices.*skipped' "$guest_log"; then
    echo "error: the two-device test was skipped" >&2
    rc=1
fi
exit "$rc"
