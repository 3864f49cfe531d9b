#!/usr/bin/env bash
# Runs the cxl plugin's device test on QEMU's emulated CXL type-3 memory device: boots the guest
# with a CXL host bridge, creates a region and a devdax namespace (/dev/dax0.0) as demo-cxl.sh
# does, and runs the "cxl plugin on an emulated CXL device" suite from the built test binary.
#   swift build --build-tests && scripts/vm/test-cxl.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(swift build --show-bin-path)
tests=$(ls -d "$bin"/*PackageTests.xctest | head -1)
[ -f "$bin/libtransport_cxl.so" ] || { echo "error: libtransport_cxl.so was not built (install libcxl-dev libdaxctl-dev)" >&2; exit 1; }
inner=$(mktemp -p "$PWD" .cxl-guest.XXXXXX.sh)
log=$(mktemp)
trap 'rm -f "$inner" "$log" /tmp/cxl-pmem0.raw /tmp/cxl-lsa0.raw' EXIT
cat > "$inner" <<INNER
set -u
bash scripts/vm/cxl-setup.sh || exit \$?
ls -l /dev/dax* && daxctl list
TE_CXL_GUEST=1 "$tests" --testing-library swift-testing --filter CXLGuestTests
INNER
set +e
RXE_VM_MACHINE='q35,cxl=on,cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G' RXE_VM_EXTRA_QEMU="$(cat scripts/vm/cxl-qemu-args)" \
    scripts/vm/run-in-rxe-guest.sh -t "${TE_CXL_TEST_TIMEOUT:-600}" --script "$inner" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 0 ] && ! grep -q 'Suite "cxl plugin on an emulated CXL device (in the guest)" passed' "$log"; then
    echo "error: the cxl guest suite did not run" >&2
    rc=1
fi
exit "$rc"
