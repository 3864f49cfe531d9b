#!/usr/bin/env bash
# The nvmeof plugin's benchmark on a kernel NVMe-oF target in the soft-RoCE guest (host side):
# creates an nvmet subsystem (tmpfs-backed namespace) on NVMe/RDMA over rxe0, connects it with
# nvme-cli, measures the raw block device with fio (psync, and io_uring to decide whether the
# plugin should use it) and then
# `transfer-engine bench --protocol nvmeof` on the same namespace in the same boot. Writes
# out/fio-*.json and out/bench-nvmeof.json; scripts/bench_summary.py prints the ratios.
# Absolute numbers are emulation speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${TE_BIN:-$(swift build -c release --show-bin-path)}
bin=${bin#$PWD/}
command -v fio >/dev/null || { echo "error: fio is not installed (apt-get install fio)" >&2; exit 1; }
mkdir -p out
rm -f out/fio-*.json
inner=$(mktemp -p "$PWD" .nvmeof-bench.XXXXXX.sh)
trap 'rm -f "$inner"' EXIT
cat > "$inner" <<INNER
set -u
[ -s /etc/nvme/hostnqn ] || { mkdir -p /etc/nvme; nvme gen-hostnqn > /etc/nvme/hostnqn; }
nqn=nqn.2026-11.io.test:bench
bash scripts/vm/nvmeof-setup.sh rdma \$RXE_IP 4421 \$nqn /tmp/ns-bench.img 256M >/dev/null || exit \$?
nvme connect -t rdma -a \$RXE_IP -s 4421 -n \$nqn >/dev/null || exit 1
for i in \$(seq 100); do dev=\$(ls /sys/class/nvme-subsystem/*/ 2>/dev/null | grep -E '^nvme[0-9]+n[0-9]+\$' | head -1); [ -n "\$dev" ] && [ -b /dev/\$dev ] && break; sleep 0.1; done
echo "== fio on /dev/\$dev (NVMe/RDMA over rxe0, direct I/O)"
run() { # name engine rw bs depth jobs
    timeout -k 5 \$(( \${TE_FIO_SECONDS:-3} + 30 )) fio --name=\$1 --filename=/dev/\$dev --ioengine=\$2 --rw=\$3 --bs=\$4 --iodepth=\$5 --numjobs=\$6 --direct=1 \
        --size=64M --time_based --runtime=\${TE_FIO_SECONDS:-3} --group_reporting --output-format=json > out/fio-\$1.json 2>/dev/null
    [ -s out/fio-\$1.json ] || { echo "\$1: no result (fio timed out)"; rm -f out/fio-\$1.json; return; }
    python3 -c "import json,sys; j=json.load(open('out/fio-\$1.json'))['jobs'][0]; op='write' if 'write' in '\$3' else 'read'; print('%-28s %10.1f MB/s %9.1f us mean' % ('\$1', j[op]['bw_bytes']/1e6, j[op]['clat_ns']['mean']/1e3))"
}
for op in write read; do
    run psync-\$op-4k psync \$op 4k 1 1
    run psync-\$op-4k-x4 psync \$op 4k 1 4
    run psync-\$op-1m-x4 psync \$op 1m 1 4
done
# 4 in flight, as fio's 4 jobs. NVMe/RDMA rather than NVMe/TCP: under sustained load (fio io_uring
# qd16, or the engine's bench) this guest kernel's NVMe/TCP loopback oopsed in usercopy_abort
# (nvmet-tcp) and every later I/O hung in D state.
echo "== transfer-engine bench --protocol nvmeof on the same namespace"
MC_STRICT_PROTOCOL=1 MC_NVMEOF_NAMESPACES=/dev/\$dev MC_TRANSPORT_PLUGIN_PATH=\$PWD/$bin timeout 600 $bin/transfer-engine bench --loopback \
    --protocol nvmeof --buffer-size 64MiB --block-sizes 4KiB,1MiB --batch-sizes 1,4 --duration \${TE_DURATION:-2} --no-reference \
    --local-heap --json out/bench-nvmeof.json 2>&1 | grep -E "^(op|write|read|-----)"
# io_uring last, at depth 4 (see above).
for op in write read; do
    run io_uring-\$op-4k-qd4 io_uring \$op 4k 4 1
    run io_uring-\$op-1m-qd4 io_uring \$op 1m 4 1
done
nvme disconnect -n \$nqn >/dev/null
INNER
scripts/vm/run-in-rxe-guest.sh -t 420 --script "$inner" 2>&1 | grep -v '^\[rxe-vm'
