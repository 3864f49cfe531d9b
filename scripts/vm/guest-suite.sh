# Sourced by the test-<plugin>.sh scripts: find the built test binary, run one guest suite in the
# soft-RoCE guest, and fail when the suite did not actually run (a guest that skipped everything
# must not pass).
#   guest_test_binary libtransport_cxl.so "install libcxl-dev libdaxctl-dev"   # sets $tests and $bin
#   run_guest_suite "suite title" [run-in-rxe-guest.sh arguments...]           # sets $rc and $guest_log

guest_test_binary() {  # plugin-file install-hint
    bin=$(swift build --show-bin-path)
    tests=$(ls -d "$bin"/*PackageTests.xctest 2>/dev/null | head -1)
    [ -n "$tests" ] && [ -x "$tests" ] || { echo "error: no test binary in $bin (run swift build --build-tests first)" >&2; exit 1; }
    [ -f "$bin/$1" ] || { echo "error: $1 was not built ($2)" >&2; exit 1; }
}

run_guest_suite() {  # suite-title run-in-rxe-guest.sh-arguments...
    local title=$1
    shift
    guest_log=$(mktemp)
    set +e
    scripts/vm/run-in-rxe-guest.sh "$@" 2>&1 | tee "$guest_log"
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 0 ] && ! grep -q "Suite \"$title\" passed" "$guest_log"; then
        echo "error: the guest suite \"$title\" did not run" >&2
        rc=1
    fi
}
