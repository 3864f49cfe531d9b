#!/usr/bin/env bash
# The cxl plugin's benchmark on the emulated CXL device (host side): boots the CXL guest, makes
# /dev/dax0.0 and runs `transfer-engine bench --protocol cxl` per block size. Its ceiling is measured
# inside the bench (--memcpy-reference): memcpy between the bench's own heap buffer and a pool buffer
# of its engine, right before and after each case; raw memcpy into/out of the device mapping
# (dax_memcpy.c, a separate process) runs beside each case as well, and the ceiling is the better of
# the two (the emulation runs at one of two speeds by stretches of seconds). Writes out/dax-memcpy.txt
# and out/bench-cxl.json; scripts/bench_summary.py prints the ratios. Absolute numbers are emulation speed.
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
# Emulation speed drifts over a boot, so dax_memcpy samples each block size right before and right
# after that size's case (the summary prints the better sample; the bench samples its own ceiling
# around the case as well); the cases' results and ceilings are merged into one file afterwards.
: > out/dax-memcpy.txt
rm -f out/bench-cxl.json out/bench-cxl-*.json
for case in 4096:4KiB 1048576:1MiB 67108864:64MiB; do
    bytes=\${case%%:*} block=\${case#*:}
    out/dax_memcpy /dev/dax0.0 \$bytes | tee -a out/dax-memcpy.txt
    MC_STRICT_PROTOCOL=1 MC_TRANSPORT_PLUGIN_PATH=\$PWD/$bin $bin/transfer-engine bench --loopback --protocol cxl --buffer-size 96MiB \
        --block-sizes \$block --batch-sizes 1 --duration ${TE_DURATION:-1} --no-reference --local-heap --memcpy-reference --memcpy-seconds 0.5 --json out/bench-cxl-\$bytes.json 2>&1 \
        | grep -E "^(op|write|read|-----)"
    out/dax_memcpy /dev/dax0.0 \$bytes | tee -a out/dax-memcpy.txt
done
python3 scripts/vm/merge_bench_json.py out/bench-cxl.json out/bench-cxl-4096.json out/bench-cxl-1048576.json out/bench-cxl-67108864.json
rm -f out/bench-cxl-*.json
INNER
RXE_VM_MACHINE='q35,cxl=on,cxl-fmw.0.targets.0=cxl.1,cxl-fmw.0.size=4G' RXE_VM_EXTRA_QEMU="$(cat scripts/vm/cxl-qemu-args)" \
    scripts/vm/run-in-rxe-guest.sh -t 600 --script "$inner" 2>&1 | grep -v '^\[rxe-vm'
