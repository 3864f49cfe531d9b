#!/bin/bash
# Runs INSIDE the guest booted with the CXL arguments (test-cxl.sh and cxl-bench.sh do that):
# loads the CXL/DAX drivers, creates a pmem region on mem0 and a devdax namespace -> /dev/dax0.0.
set -u
modprobe -a cxl_acpi cxl_pci cxl_mem cxl_pmem dax_pmem device_dax nd_pmem >/dev/null 2>&1
for i in $(seq 50); do [ -e /sys/bus/cxl/devices/mem0 ] && break; sleep 0.2; done
cxl create-region -m -d decoder0.0 -t pmem -w 1 mem0 >/dev/null 2>&1 || { echo "cxl create-region failed"; exit 125; }
region=$(ndctl list -R 2>/dev/null | grep -o '"dev":"region[0-9]*"' | head -1 | cut -d'"' -f4)
ndctl create-namespace -m devdax -r "$region" -f >/dev/null 2>&1 || { echo "ndctl create-namespace failed"; exit 125; }
[ -e /dev/dax0.0 ] || { echo "/dev/dax0.0 did not appear"; exit 125; }
