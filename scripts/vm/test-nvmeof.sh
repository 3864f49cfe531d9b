#!/usr/bin/env bash
# Runs the nvmeof plugin's guest suite against real kernel NVMe-oF targets: boots the soft-RoCE
# guest, creates an nvmet subsystem on NVMe/TCP (127.0.0.1:4420) and one on NVMe/RDMA over rxe0
# (port 4421), and runs the "nvmeof plugin on kernel NVMe-oF targets" suite from the built test
# binary: the plugin connects with libnvme (by subsystem URI, and by discovery), moves data with
# direct I/O and through the owner, and disconnects when the engine closes; then the conformance
# suite's case on the NVMe/TCP target.
#   swift build --build-tests && scripts/vm/test-nvmeof.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/vm/guest-suite.sh
guest_test_binary libtransport_nvmeof.so "install libnvme-dev"
inner=$(mktemp -p "$PWD" .nvmeof-guest.XXXXXX.sh)
trap 'rm -f "$inner" "${guest_log:-}"' EXIT
cat > "$inner" <<INNER
set -u
[ -s /etc/nvme/hostnqn ] || { mkdir -p /etc/nvme; nvme gen-hostnqn > /etc/nvme/hostnqn; }
bash scripts/vm/nvmeof-setup.sh tcp 127.0.0.1 4420 nqn.2026-11.io.test:tcp /tmp/ns-tcp.img 256M || exit \$?
bash scripts/vm/nvmeof-setup.sh rdma "\$RXE_IP" 4421 nqn.2026-11.io.test:rdma /tmp/ns-rdma.img 128M || exit \$?
TE_NVMEOF_GUEST=1 TE_NVMEOF_TCP=tcp://127.0.0.1:4420/nqn.2026-11.io.test:tcp TE_NVMEOF_TCP_FILE=/tmp/ns-tcp.img \
TE_NVMEOF_RDMA_DISCOVERY=rdma://\$RXE_IP:4421 TE_NVMEOF_RDMA_FILE=/tmp/ns-rdma.img \
    "$tests" --testing-library swift-testing --filter NVMeoFGuestTests || exit \$?
# Then the conformance suite's kernel-target case alone (the other cases run on the host). The
# subsystem is connected here first: its scenarios run at once, each with its own owner, and an
# owner disconnects at exit only what it connected itself.
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-11.io.test:tcp >/dev/null || exit \$?
CONFORMANCE_ONLY="kernel NVMe/TCP" TE_NVMEOF_TCP=tcp://127.0.0.1:4420/nqn.2026-11.io.test:tcp \
    "$tests" --testing-library swift-testing --filter ConformanceTests
INNER
run_guest_suite "nvmeof plugin on kernel NVMe-oF targets (in the guest)" -t "${TE_NVMEOF_TEST_TIMEOUT:-600}" --script "$inner"
if [ "$rc" = 0 ] && ! grep -q 'Suite "Transport conformance" passed' "$guest_log"; then
    echo "error: the conformance suite's kernel NVMe/TCP case did not run in the guest" >&2
    rc=1
fi
exit "$rc"
