#!/usr/bin/env bash
# Runs the whole test suite: swift test, the Python package's pytest suite, the rdma plugin in a
# soft-RoCE QEMU guest (scripts/vm/test-rdma.sh; TE_SKIP_VM=1 skips it), then the Debian packages
# installed into a fresh Debian 12 root (packaging/test-debs.sh; TE_SKIP_PACKAGING=1 skips it).
# This is the test command README.md gives and .ci/run calls.
#
# The interop tests run the official Mooncake engine (PyPI wheel
# mooncake-transfer-engine-non-cuda) against this one. This script installs the
# wheel into .build-interop-venv once; TE_SKIP_INTEROP=1 skips that (the interop
# suite is then reported as skipped). --manifest-cache none: plugin targets depend
# on which -dev headers are installed.
#
#   scripts/test.sh --sanitize thread|address   # instead: the suites under a sanitizer (scripts/sanitize.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v swift >/dev/null || { echo "error: swift is not on PATH (Swift 6 toolchain expected, e.g. /opt/swift/usr/bin)" >&2; exit 1; }
if [ "${1:-}" = --sanitize ]; then
    [ -n "${2:-}" ] || { echo "usage: scripts/test.sh --sanitize thread|address" >&2; exit 2; }
    exec scripts/sanitize.sh "$2"
fi
# The packages the build and the tests use (plugins' -dev packages, etcd, redis, packaging tools),
# installed before anything is built; without root it lists what is missing and what is skipped.
scripts/setup.sh
command -v cc >/dev/null || { echo "error: a C compiler (cc) is needed to build the ABI fixture plugins: apt-get install gcc libc6-dev" >&2; exit 1; }

wheel="mooncake-transfer-engine-non-cuda==0.3.13.post1"
venv=.build-interop-venv
if [ "${TE_SKIP_INTEROP:-0}" != 1 ]; then
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import mooncake.engine" 2>/dev/null; then
        echo "== installing the official engine for the interop tests ($wheel)"
        if python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "$wheel"; then
            :
        else
            echo "warning: could not install $wheel; the interop tests will be skipped" >&2
        fi
    fi
    if "$venv/bin/python" -c "import mooncake.engine" 2>/dev/null; then
        export TE_MOONCAKE_PYTHON="$PWD/$venv/bin/python" TE_REQUIRE_INTEROP=1
    fi
fi

# With libfabric-dev / libibverbs-dev / libcxl-dev / libnvme-dev present the efa / rdma / cxl / nvmeof plugins are built, so their suites must run.
[ -f /usr/include/rdma/fabric.h ] && export TE_REQUIRE_EFA=1
[ -f /usr/include/infiniband/verbs.h ] && export TE_REQUIRE_RDMA=1
[ -f /usr/include/daxctl/libdaxctl.h ] && [ -f /usr/include/cxl/libcxl.h ] && export TE_REQUIRE_CXL=1
[ -f /usr/include/libnvme.h ] && export TE_REQUIRE_NVMEOF=1
[ -f /usr/include/hip/hip_runtime_api.h ] && export TE_REQUIRE_HIP=1

# A plugin's optional support follows the headers installed now (root, libamdhip64-dev).
scripts/check-feature-detection.sh

swift test --manifest-cache none "$@"

# The Python package over the C API library that swift test just built.
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --disable-pip-version-check pytest
TRANSFER_ENGINE_LIBRARY="$(swift build --show-bin-path)/libtransfer_engine_c.so" python3 -m pytest -q python/tests

# Every decoder of peer and metadata-server input under libFuzzer + AddressSanitizer, briefly
# (scripts/fuzz.sh runs longer on demand). TE_SKIP_FUZZ=1 skips it.
if [ "${TE_SKIP_FUZZ:-0}" = 1 ]; then
    echo "fuzzing skipped (TE_SKIP_FUZZ=1)"
else
    scripts/fuzz.sh --seconds "${TE_FUZZ_SECONDS:-10}"
fi

# The rdma, cxl and nvmeof plugins on real kernel stacks: QEMU guests with Debian's kernel (software
# emulation, no KVM needed; the scripts install qemu, rdma-core and ndctl tools as root): soft-RoCE
# for rdma, an emulated CXL type-3 device for cxl, nvmet targets over TCP and rxe for nvmeof; and
# the network fault tests with netem, which Debian's kernel has. TE_SKIP_VM=1 skips them.
bin_path=$(swift build --show-bin-path)
if [ "${TE_SKIP_VM:-0}" = 1 ]; then
    echo "guest tests skipped (TE_SKIP_VM=1)"
elif [ "$(id -u)" != 0 ]; then
    echo "warning: guest tests skipped: they need root (qemu, rdma-core, ndctl)" >&2
else
    if [ -f "$bin_path/libtransport_rdma.so" ]; then
        echo "== rdma plugin tests in the soft-RoCE guest"
        scripts/vm/test-rdma.sh
    fi
    if [ -f "$bin_path/libtransport_cxl.so" ]; then
        echo "== cxl plugin test on QEMU's emulated CXL device"
        scripts/vm/test-cxl.sh
    fi
    if [ -f "$bin_path/libtransport_nvmeof.so" ]; then
        echo "== nvmeof plugin tests on kernel NVMe-oF targets (NVMe/TCP, NVMe/RDMA over rxe) in the guest"
        scripts/vm/test-nvmeof.sh
    fi
    echo "== network faults with tc netem (delay, loss, partition) between namespaces in the guest"
    scripts/vm/test-netem.sh
fi

# The Debian packages, installed and run in a fresh Debian 12 root without the toolchain.
if [ "${TE_SKIP_PACKAGING:-0}" = 1 ]; then
    echo "packaging test skipped (TE_SKIP_PACKAGING=1)"
elif [ "$(id -u)" = 0 ] && command -v debootstrap >/dev/null && command -v patchelf >/dev/null; then
    packaging/test-debs.sh
else
    echo "warning: packaging test skipped: it needs root, debootstrap, patchelf and dpkg-dev" >&2
fi
