#!/usr/bin/env bash
# The cxl plugin's benchmark on the emulated CXL device (host side): boots the CXL guest, makes
# /dev/dax0.0, measures raw memcpy into/out of the device mapping (dax_memcpy.c) and
# `transfer-engine bench --protocol cxl` in the same boot. Writes out/dax-memcpy.txt and
# out/bench-cxl.json; scripts/bench_summary.py prints the ratios. Absolute numbers are emulation speed.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${TE_BIN:-$(swift build -c release --show-bin-path)}
bin=${bin#$PWD/}
mkdir -p out
cc -O2 -o out/dax_memcpy scripts/vm/dax_memcpy.c
inner=$(mktemp -p "$PWD" .cxl-bench.XXXXXX.sh)
trap 'rm -f "$inner" /tmp/cxl-pmem0.raw /tmp/cxl-lsa0.raw' EXIT
cat > "$inner" <<INNER
set -u
bash scripts/vm/cxl-setup.sh || exit \$?
out/dax_memcpy /dev/dax0.0 | tee out/dax-memcpy.txt
MC_STRICT_PROTOCOL=1 MC_TRANSPORT_PLUGIN_PATH=\$PWD/$bin $bin/transfer-engine bench --loopback --protocol cxl --buffer-size 96MiB \
    --block-sizes 4KiB,1MiB,64MiB --batch-sizes 1 --duration ${TE_DURATION:-1} --no-reference --local-heap --json out/bench-cxl.json 2>&1 | grep -E "^(op|write|read|-----)"
# The ceiling again after the bench (the summary takes the better per size): emulation speed drifts.
out/dax_memcpy /dev/dax0.0 | tee -a out/dax-memcpy.txt
INNER
RXE_VM_MACHINE='q35,cxl=on,cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G' RXE_VM_EXTRA_QEMU="$(cat scripts/vm/cxl-qemu-args)" \
    scripts/vm/run-in-rxe-guest.sh -t 600 --script "$inner" 2>&1 | grep -v '^\[rxe-vm'
