#!/usr/bin/env bash
# Runs the test suites under a sanitizer and fails on any report:
#   scripts/sanitize.sh                # ThreadSanitizer (scratch .build-tsan)
#   scripts/sanitize.sh address        # AddressSanitizer, plus UndefinedBehaviorSanitizer on the C shims (scratch .build-asan)
# The engine, the plugins and their C shims are all instrumented. The test binary is linked with
# --export-dynamic so that the instrumented plugins it dlopens find the sanitizer runtime linked
# statically into it. Left out: the C API tests (they build plain C programs, which have no
# sanitizer runtime) and the interop tests (the official engine's Python wheel).
# The build takes several minutes; the run about ten.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-thread}
case "$kind" in
thread) flags=(--sanitize=thread); scratch=.build-tsan; pattern="WARNING: ThreadSanitizer"
        export TSAN_OPTIONS="halt_on_error=0 ${TSAN_OPTIONS:-}" ;;
address) flags=(--sanitize=address -Xcc -fsanitize=undefined); scratch=.build-asan  # UBSan: the C code (Swift checks its own arithmetic)
         pattern="ERROR: AddressSanitizer|runtime error:"
         # detect_odr_violation=0: the test binary links the GPU plugin's module for its unit tests
         # and also loads the GPU plugins' .so files, so their C shim's globals exist twice by design.
         export ASAN_OPTIONS="detect_leaks=0 detect_odr_violation=0 ${ASAN_OPTIONS:-}" UBSAN_OPTIONS="print_stacktrace=1 ${UBSAN_OPTIONS:-}" ;;
*) echo "usage: scripts/sanitize.sh [thread|address]" >&2; exit 2 ;;
esac
echo "== building the tests with ${flags[*]} (scratch $scratch)"
swift build --build-tests --manifest-cache none "${flags[@]}" --scratch-path "$scratch" -Xlinker --export-dynamic 2>&1 \
    | grep -E "error|complete" | tail -2
mkdir -p out
log=out/sanitize-$kind.log
TE_TEST_PRODUCTS_DIR="$PWD/$scratch/debug" \
    swift test --skip-build "${flags[@]}" --scratch-path "$scratch" --skip "InteropTests|CAPI" > "$log" 2>&1 || status=$?
reports=$(grep -cE "$pattern" "$log" || true)
grep -E "Test run with" "$log" | tail -1
if [ "$reports" != 0 ]; then
    grep -E -A30 "$pattern" "$log" | head -80 >&2
    echo "FAIL: $reports $kind sanitizer reports (full log: $log)" >&2
    exit 1
fi
if [ "${status:-0}" != 0 ]; then
    grep -E "✘" "$log" | head -20 >&2
    echo "FAIL: tests failed under the $kind sanitizer (full log: $log)" >&2
    exit 1
fi
echo "PASS: no $kind sanitizer report"
