set -u
[ -s /etc/nvme/hostnqn ] || { mkdir -p /etc/nvme; nvme gen-hostnqn > /etc/nvme/hostnqn; }
bash scripts/vm/nvmeof-setup.sh tcp 127.0.0.1 4420 nqn.2026-11.io.test:tcp /tmp/ns-tcp.img 256M || exit $?
bash scripts/vm/nvmeof-setup.sh rdma "$RXE_IP" 4421 nqn.2026-11.io.test:rdma /tmp/ns-rdma.img 128M || exit $?
TE_NVMEOF_GUEST=1 TE_NVMEOF_TCP=tcp://127.0.0.1:4420/nqn.2026-11.io.test:tcp TE_NVMEOF_TCP_FILE=/tmp/ns-tcp.img TE_NVMEOF_RDMA_DISCOVERY=rdma://$RXE_IP:4421 TE_NVMEOF_RDMA_FILE=/tmp/ns-rdma.img     "/work/main/.build/x86_64-unknown-linux-gnu/debug/swift-transfer-enginePackageTests.xctest" --testing-library swift-testing --filter NVMeoFGuestTests || exit $?
# Then the conformance suite's kernel-target case alone (the other cases run on the host). The
# subsystem is connected here first: its scenarios run at once, each with its own owner, and an
# owner disconnects at exit only what it connected itself.
nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-11.io.test:tcp >/dev/null || exit $?
CONFORMANCE_ONLY="kernel NVMe/TCP" TE_NVMEOF_TCP=tcp://127.0.0.1:4420/nqn.2026-11.io.test:tcp     "/work/main/.build/x86_64-unknown-linux-gnu/debug/swift-transfer-enginePackageTests.xctest" --testing-library swift-testing --filter ConformanceTests
