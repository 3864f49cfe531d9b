#!/usr/bin/env bash
# The one setup step of README's two commands: installs the Debian packages that the build, the
# tests and the benchmarks use, before anything is built, so whichever command runs first builds
# every plugin this machine can build. scripts/bench.sh, scripts/test.sh and .ci/run call it.
#
#   scripts/setup.sh            # as root: apt-get install what is missing; otherwise list it
#   scripts/setup.sh --check    # only list what is missing and what that costs
#
# Without root (or without apt) nothing is installed: every missing package is printed with what
# goes without it (plugins not built, tests and benchmarks skipped). Exits non-zero only when a C
# compiler is missing, which nothing here can do without.
set -euo pipefail

check_only=0
[ "${1:-}" = "--check" ] && check_only=1

# package | how it is detected | what goes without it
requirements=(
    "gcc libc6-dev|cmd:cc|the ABI fixture plugins and the C API test cannot be compiled (scripts/test.sh stops)"
    "binutils|cmd:readelf|the Python package build cannot bundle the Swift runtime"
    "libfabric-dev|file:/usr/include/rdma/fabric.h|the efa plugin is not built: its tests and the efa and libfabric-probe benchmarks are skipped"
    "libibverbs-dev|file:/usr/include/infiniband/verbs.h|the rdma plugin is not built: its guest tests and benchmark are skipped"
    "libcxl-dev|file:/usr/include/cxl/libcxl.h|the cxl plugin is not built: its tests and guest benchmark are skipped"
    "libdaxctl-dev|file:/usr/include/daxctl/libdaxctl.h|the cxl plugin is not built: its tests and guest benchmark are skipped"
    "libnvme-dev|file:/usr/include/libnvme.h|the nvmeof plugin is not built: its tests and guest benchmark are skipped"
    "libamdhip64-dev|file:/usr/include/hip/hip_runtime_api.h|the hip plugin is not built"
    "redis-server|cmd:redis-server|the redis metadata tests are skipped"
    "etcd-server|cmd:etcd|the etcd metadata tests are skipped"
    "python3-venv|py:ensurepip|the official engine (interop tests, benchmark reference) cannot be installed"
    "python3-pytest|py:pytest|pytest is installed with pip instead"
    "iperf3|cmd:iperf3|the iperf3 reference of the benchmark is skipped"
    "ndctl|cmd:cxl|the cxl guest test cannot create /dev/dax0.0"
    "nvme-cli|cmd:nvme|the nvmeof guest test cannot make its host NQN"
    "fio|cmd:fio|the nvmeof guest benchmark has no reference"
    "debootstrap|cmd:debootstrap|the Debian package test (fresh Debian root) is skipped"
    "patchelf|cmd:patchelf|the Debian packages cannot be built (and their test is skipped)"
    "dpkg-dev|cmd:dpkg-shlibdeps|the Debian packages cannot be built (and their test is skipped)"
    "file|cmd:file|the Debian packages cannot be built (and their test is skipped)"
    "lintian|cmd:lintian|the Debian packages are not checked with lintian"
    "python3-matplotlib|file:/usr/lib/python3/dist-packages/matplotlib/__init__.py|scripts/bench.sh draws no chart (out/bench.png, out/bench.svg)"
    "prometheus|cmd:promtool|the metrics tests neither check the scrape with promtool nor have a real Prometheus server scrape a serve process"
)

present() {  # detector
    local kind=${1%%:*} what=${1#*:}
    case $kind in
        cmd) command -v "$what" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$what" >/dev/null 2>&1 ;;
        file) [ -e "$what" ] ;;
        py) python3 -c "import $what" >/dev/null 2>&1 ;;
    esac
}

missing_packages=()
missing_lines=()
scan() {
    missing_packages=()
    missing_lines=()
    local entry packages detector cost
    for entry in "${requirements[@]}"; do
        IFS='|' read -r packages detector cost <<<"$entry"
        if ! present "$detector"; then
            missing_packages+=($packages)
            missing_lines+=("  $packages: $cost")
        fi
    done
}

# SwiftPM reuses its build plan while Package.swift and the source list are unchanged, so a
# plugin's -dev header that appeared or went since the last build (Package.swift decides plugin
# targets and defines from them) would not be seen: when the set of those headers changed, drop
# the cached plans (description.json) so the next build evaluates the manifest again.
replan_if_headers_changed() {
    local fingerprint="" header stamp=.build/te-feature-headers
    for header in /usr/include/infiniband/verbs.h /usr/include/daxctl/libdaxctl.h /usr/include/cxl/libcxl.h \
                  /usr/include/rdma/fabric.h /usr/include/libnvme.h /usr/include/hip/hip_runtime_api.h; do
        [ -e "$header" ] && fingerprint+="$header "
    done
    if [ -d .build ] && [ "$(cat "$stamp" 2>/dev/null)" != "$fingerprint" ]; then
        find .build .build-python -maxdepth 3 -name description.json -delete 2>/dev/null || true
        echo "== setup: plugin headers changed since the last build; the next build re-plans"
    fi
    mkdir -p .build && echo "$fingerprint" > "$stamp"
}

cd "$(dirname "$0")/.."
scan
if [ ${#missing_packages[@]} -eq 0 ]; then
    replan_if_headers_changed
    echo "== setup: every package the build, tests and benchmarks use is installed"
    exit 0
fi

if [ $check_only = 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== setup: installing ${missing_packages[*]}"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_packages[@]}" >/dev/null; }; then
        echo "warning: apt-get install failed; continuing with what is installed" >&2
    fi
    scan
    replan_if_headers_changed
    [ ${#missing_packages[@]} -eq 0 ] && { echo "== setup: done"; exit 0; }
fi
replan_if_headers_changed

echo "warning: missing Debian packages (install as root: apt-get install ${missing_packages[*]}):" >&2
printf '%s\n' "${missing_lines[@]}" >&2
command -v cc >/dev/null || { echo "error: a C compiler (cc) is required: apt-get install gcc libc6-dev" >&2; exit 1; }
exit 0
