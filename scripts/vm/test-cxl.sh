#!/usr/bin/env bash
# Runs the cxl plugin's device test on QEMU's emulated CXL type-3 memory device: boots the guest
# with a CXL host bridge, creates a region and a devdax namespace (/dev/dax0.0) as demo-cxl.sh
# does, and runs the "cxl plugin on an emulated CXL device" suite from the built test binary.
#   swift build --build-tests && scripts/vm/test-cxl.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/vm/guest-suite.sh
guest_test_binary libtransport_cxl.so "install libcxl-dev libdaxctl-dev"
inner=$(mktemp -p "$PWD" .cxl-guest.XXXXXX.sh)
trap 'rm -f "$inner" "${guest_log:-}" /tmp/cxl-pmem0.raw /tmp/cxl-lsa0.raw' EXIT
cat > "$inner" <<INNER
set -u
bash scripts/vm/cxl-setup.sh || exit \$?
ls -l /dev/dax* && daxctl list
TE_CXL_GUEST=1 CONFORMANCE_ONLY="emulated CXL" "$tests" --testing-library swift-testing --filter "CXLGuestTests|ConformanceTests"
INNER
RXE_VM_MACHINE='q35,cxl=on,cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G' RXE_VM_EXTRA_QEMU="$(cat scripts/vm/cxl-qemu-args)" \
    run_guest_suite "cxl plugin on an emulated CXL device (in the guest)" -t "${TE_CXL_TEST_TIMEOUT:-600}" --script "$inner"
if [ "$rc" = 0 ] && ! grep -q 'Suite "Transport conformance" passed' "$guest_log"; then
    echo "error: the conformance suite's cxl case did not run in the guest" >&2
    rc=1
fi
exit "$rc"
