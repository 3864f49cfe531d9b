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
# Then the plugin checker (plugins --check) on the rdma plugin, every check expected to run.
# The rdma plugin's handshake decoder under libFuzzer + ASan, where a device exists (scripts/fuzz.sh
# built the harness and the instrumented plugin; skipped when it has not run).
fuzz_bin=$(TE_FUZZ=1 swift build --scratch-path .build-fuzz --show-bin-path 2>/dev/null || true)
fuzz_run=true
if [ -x "$fuzz_bin/te-fuzz" ] && [ -f "$fuzz_bin/libtransport_rdma.so" ]; then
    mkdir -p out/fuzz .build-fuzz/corpus/plugin-rdma
    # The guest has a device, so a skip is a failure there. The guest has 2 GiB of memory.
    fuzz_run="TE_FUZZ_TARGET=plugin-rdma TE_FUZZ_PLUGIN_DIR='$fuzz_bin' ASAN_OPTIONS=detect_leaks=0 '$fuzz_bin/te-fuzz' -max_total_time=${TE_FUZZ_SECONDS:-10} -timeout=10 -rss_limit_mb=1024 -artifact_prefix=out/fuzz/plugin-rdma- -print_final_stats=1 .build-fuzz/corpus/plugin-rdma Fuzz/corpus/plugin-rdma > out/fuzz/plugin-rdma.log 2>&1 || { tail -40 out/fuzz/plugin-rdma.log; echo 'FAIL: plugin-rdma fuzzing crashed'; exit 1; }; if grep -q SKIPPED out/fuzz/plugin-rdma.log; then cat out/fuzz/plugin-rdma.log; echo 'FAIL: plugin-rdma skipped in the guest'; exit 1; fi; grep -E 'number_of_executed_units' out/fuzz/plugin-rdma.log"
fi
cat > "$inner" <<INNER
set -u
"$tests" --testing-library swift-testing --filter RDMAGuestTests || exit \$?
CONFORMANCE_ONLY=rdma "$tests" --testing-library swift-testing --filter ConformanceTests || exit \$?
"$bin/transfer-engine" plugins --check "$bin/libtransport_rdma.so" --device-name rxe0 || exit \$?
$fuzz_run
INNER
RXE_VM_DEVICES=2 run_guest_suite "rdma plugin over soft-RoCE (in the guest)" -t "${TE_RDMA_TEST_TIMEOUT:-900}" --script "$inner"
if [ "$rc" = 0 ] && ! grep -q 'Suite "Transport conformance" passed' "$guest_log"; then
    echo "error: the conformance suite's rdma case did not run in the guest" >&2
    rc=1
fi
if [ "$rc" = 0 ] && ! grep -Eq '^[0-9]+ passed, 0 failed, 0 skipped' "$guest_log"; then
    echo "error: plugins --check on the rdma plugin did not run every check in the guest" >&2
    rc=1
fi
if grep -q "skipped" "$guest_log" && grep -q 'two soft-RoCE devices.*skipped' "$guest_log"; then
    echo "error: the two-device test was skipped" >&2
    rc=1
fi
exit "$rc"
