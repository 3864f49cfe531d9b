#!/usr/bin/env bash
# Runs the host engine's test suites under ThreadSanitizer (scratch .build-tsan) and fails on any
# race report. Suites that load a plugin are left out: an instrumented plugin cannot be dlopened
# into a process whose TSan runtime is linked statically (undefined __tsan_* symbols), so they run
# uninstrumented in scripts/test.sh; the C API test links a plain C program, which has no TSan
# runtime either.
#
#   scripts/sanitize.sh            # about a minute after the build (the build: several minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== building the tests with -sanitize=thread (scratch .build-tsan)"
swift build --build-tests --manifest-cache none --sanitize=thread --scratch-path .build-tsan 2>&1 | grep -E "error|complete" | tail -2
mkdir -p out
log=out/tsan.log
TSAN_OPTIONS="halt_on_error=0" TE_TEST_PRODUCTS_DIR="$PWD/.build-tsan/debug" \
    swift test --skip-build --sanitize=thread --scratch-path .build-tsan \
    --skip "InteropTests|RDMA|CXL|NVMeoF|EFA|SHM|PluginTests|managedBuffers|SelfTransfer|gpuRuntimes|GPU|CAPI" > "$log" 2>&1 || true
races=$(grep -c "WARNING: ThreadSanitizer" "$log" || true)
grep -E "Test run with" "$log" | tail -1
if [ "$races" != 0 ]; then
    grep -A30 "WARNING: ThreadSanitizer" "$log" | head -80 >&2
    echo "FAIL: $races ThreadSanitizer reports (full log: $log)" >&2
    exit 1
fi
echo "PASS: no ThreadSanitizer report"
