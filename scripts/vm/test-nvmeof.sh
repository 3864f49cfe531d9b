#!/usr/bin/env bash
# Runs the nvmeof plugin's guest suite against real kernel NVMe-oF targets: boots the soft-RoCE
# guest, creates an nvmet subsystem on NVMe/TCP (127.0.0.1:4420) and one on NVMe/RDMA over rxe0
# (port 4421), and runs the "nvmeof plugin on kernel NVMe-oF targets" suite from the built test
# binary: the plugin connects with libnvme (by subsystem URI, and by discovery), moves data with
# direct I/O and through the owner, and disconnects when the engine closes.
#   swift build --build-tests && scripts/vm/test-nvmeof.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(swift build --show-bin-path)
tests=$(ls -d "$bin"/*PackageTests.xctest | head -1)
[ -f "$bin/libtransport_nvmeof.so" ] || { echo "error: libtransport_nvmeof.so was not built (install libnvme-dev)" >&2; exit 1; }
inner=$(mktemp -p "$PWD" .nvmeof-guest.XXXXXX.sh)
log=$(mktemp)
trap 'rm -f "$inner" "$log"' EXIT
cat > "$inner" <<INNER
set -u
[ -s /etc/nvme/hostnqn ] || { mkdir -p /etc/nvme; nvme gen-hostnqn > /etc/nvme/hostnqn; }
bash scripts/vm/nvmeof-setup.sh tcp 127.0.0.1 4420 nqn.2026-11.io.test:tcp /tmp/ns-tcp.img 256M || exit \$?
bash scripts/vm/nvmeof-setup.sh rdma "\$RXE_IP" 4421 nqn.2026-11.io.test:rdma /tmp/ns-rdma.img 128M || exit \$?
TE_NVMEOF_GUEST=1 TE_NVMEOF_TCP=tcp://127.0.0.1:4420/nqn.2026-11.io.test:tcp TE_NVMEOF_TCP_FILE=/tmp/ns-tcp.img \
TE_NVMEOF_RDMA_DISCOVERY=rdma://\$RXE_IP:4421 TE_NVMEOF_RDMA_FILE=/tmp/ns-rdma.img \
    "$tests" --testing-library swift-testing --filter NVMeoFGuestTests
INNER
set +e
scripts/vm/run-in-rxe-guest.sh -t "${TE_NVMEOF_TEST_TIMEOUT:-600}" --script "$inner" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 0 ] && ! grep -q 'Suite "nvmeof plugin on kernel NVMe-oF targets (in the guest)" passed' "$log"; then
    echo "error: the nvmeof guest suite did not run" >&2
    rc=1
fi
exit "$rc"
