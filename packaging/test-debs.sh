#!/usr/bin/env bash
# Proves the Debian packages as a user would: builds them (packaging/build-debs.sh), installs them
# with dpkg -i into a fresh Debian 12 root that has no Swift toolchain (debootstrap into a folder,
# then chroot), and runs the engine there:
#   1. `transfer-engine plugins` lists the installed plugins;
#   2. a loopback `transfer-engine bench --verify` over TCP;
#   3. MOONCAKE_PROTOCOL=efa with libfabric's tcp;ofi_rxm provider: the efa plugin is loaded;
#   4. the Python package imports and initialises an engine;
#   5. after `dpkg -r transfer-engine-plugin-efa`, MOONCAKE_PROTOCOL=efa falls back to TCP with one warning.
# Needs root, debootstrap and a Debian mirror (DEBIAN_MIRROR, default deb.debian.org). The pristine
# root is cached in TE_DEBROOT_CACHE (default /var/cache/transfer-engine/bookworm-root) and copied
# for each run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "error: needs root (debootstrap, chroot, mount)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
cache=${TE_DEBROOT_CACHE:-/var/cache/transfer-engine/bookworm-root}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
debs=$PWD/out/debs

packaging/build-debs.sh "$debs"

# The libraries the plugin packages depend on come from the mirror as a user's apt would fetch them.
include=libfabric1,libibverbs1,libcxl1,libdaxctl1,libnvme1,python3
if [ "$(cat "$cache/.complete" 2>/dev/null)" != "$include" ]; then
    echo "== debootstrap bookworm (minbase + $include) into $cache (cached for later runs)"
    rm -rf "$cache.tmp"
    mkdir -p "$(dirname "$cache")"
    debootstrap --variant=minbase --include="$include" bookworm "$cache.tmp" "$mirror" > /tmp/te-debootstrap.log 2>&1 ||
        { tail -20 /tmp/te-debootstrap.log >&2; exit 1; }
    rm -rf "$cache"
    mv "$cache.tmp" "$cache"
    echo "$include" > "$cache/.complete"
fi

root=$(mktemp -d /tmp/te-debroot.XXXXXX)
cleanup() {
    for m in dev/shm dev/pts dev sys proc; do mountpoint -q "$root/$m" && umount -l "$root/$m"; done
    rm -rf "$root"
}
trap cleanup EXIT
echo "== fresh copy of the root in $root"
cp -a "$cache/." "$root/"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
mount -t tmpfs tmpfs "$root/dev/shm"   # libfabric's shm provider and the engine's own need a /dev/shm
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }

fail() { echo "FAIL: $*" >&2; exit 1; }
in_root sh -c '! command -v swift && ! test -e /opt/swift' >/dev/null || fail "the root has a Swift toolchain"

echo "== dpkg -i"
mkdir -p "$root/tmp/debs"
cp "$debs"/*.deb "$root/tmp/debs/"
in_root sh -c 'dpkg -i /tmp/debs/*.deb' > /tmp/te-dpkg.log 2>&1 || { cat /tmp/te-dpkg.log >&2; fail "dpkg -i"; }
for elf in $(in_root sh -c 'find /usr/bin/transfer-engine /usr/lib/transfer-engine -name "*.so" -o -name transfer-engine -type f'); do
    if in_root sh -c "ldd $elf" | grep -q "not found"; then fail "$elf has unresolved libraries"; fi
done

echo "== the C API: SONAME, header, link and pkg-config file (transfer-engine-dev)"
readelf -d "$root/usr/lib/transfer-engine/libtransfer_engine_c.so.0" | grep -q "SONAME.*\[libtransfer_engine_c.so.0\]" || fail "no SONAME libtransfer_engine_c.so.0"
[ "$(readlink "$root/usr/lib/transfer-engine/libtransfer_engine_c.so")" = libtransfer_engine_c.so.0 ] || fail "no libtransfer_engine_c.so link"
# Built here with the installed -dev files (the root has no compiler), run in the root: the program
# must find libtransfer_engine_c.so.0 by its SONAME and create an engine.
cat > "$root/tmp/capi.c" <<'C'
#include <transfer_engine_c.h>
#include <stdio.h>
int main(void) {
    transfer_engine_t engine = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, 0, 0);
    if (!engine) return 1;
    destroyTransferEngine(engine);
    puts("C API: engine created and destroyed");
    return 0;
}
C
cc -o "$root/tmp/capi" "$root/tmp/capi.c" $(PKG_CONFIG_SYSROOT_DIR="$root" PKG_CONFIG_LIBDIR="$root/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH)/pkgconfig" \
    pkg-config --cflags --libs transfer-engine) -Wl,-rpath,/usr/lib/transfer-engine || fail "compiling against transfer-engine-dev"
readelf -d "$root/tmp/capi" | grep -q "NEEDED.*\[libtransfer_engine_c.so.0\]" || fail "a program linked with -ltransfer_engine_c does not need the SONAME"
in_root /tmp/capi || fail "a C program against the installed library"
# The way NIXL's Mooncake backend builds: upstream's names from the default paths, no rpath
# (the library is found through /etc/ld.so.conf.d/transfer-engine.conf). The backend is a shared
# object, which the linker lets leave the library's own dependencies (the private Swift runtime)
# to run time; this test links a program, so it asks for the same.
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
cc -o "$root/tmp/capi-upstream" "$root/tmp/capi.c" -I"$root/usr/include" -L"$root/usr/lib/$multiarch" -ltransfer_engine \
    -Wl,--allow-shlib-undefined ||
    fail "compiling with #include \"transfer_engine_c.h\" and -ltransfer_engine"
in_root /tmp/capi-upstream || fail "a program linked with -ltransfer_engine, without an rpath"

echo "== a plugin built from the installed ABI header and example passes the installed checker"
cc -shared -fPIC -O2 -I"$root/usr/include/transfer-engine" -o "$root/tmp/libtransport_loopback.so" \
    "$root/usr/share/doc/transfer-engine-dev/examples/loopback_plugin.c" -lpthread || fail "building the example plugin"
in_root transfer-engine plugins --check /tmp/libtransport_loopback.so > "$root/tmp/check.txt" 2>&1 ||
    { cat "$root/tmp/check.txt"; fail "plugins --check on the example plugin"; }
tail -1 "$root/tmp/check.txt"

echo "== the metadata server's systemd unit: installed, disabled, its command serves"
unit=$root/lib/systemd/system/transfer-engine-metadata.service
[ -f "$unit" ] && [ -f "$root/etc/transfer-engine/metadata-server.env" ] || fail "unit or its settings missing"
! ls "$root"/etc/systemd/system/*/transfer-engine-metadata.service >/dev/null 2>&1 || fail "the unit is enabled by default"
grep -qx /etc/transfer-engine/metadata-server.env "$root/var/lib/dpkg/info/transfer-engine.conffiles" || fail "settings not a conffile"
# The unit's own command line, with its own settings file, as systemd would run it.
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
in_root sh -c "set -a; . /etc/transfer-engine/metadata-server.env; set +a; TE_METADATA_PORT=0; timeout 5 $exec_start" > /tmp/te-meta.txt 2>&1 || true
grep -q "^READY metadata-server http://127.0.0.1:" /tmp/te-meta.txt || { cat /tmp/te-meta.txt; fail "the unit's command did not serve"; }

echo "== transfer-engine plugins"
in_root transfer-engine plugins | tee /tmp/te-plugins.txt
grep -q "^efa .*/usr/lib/transfer-engine/plugins/libtransport_efa.so" /tmp/te-plugins.txt || fail "efa plugin not listed"
grep -q "^shm .*available" /tmp/te-plugins.txt || fail "shm plugin not available"
for plugin in rdma cxl; do
    if ls "$debs"/transfer-engine-plugin-${plugin}_*.deb >/dev/null 2>&1; then
        grep -q "^$plugin .*hardware absent" /tmp/te-plugins.txt || fail "$plugin plugin should load and report hardware absent"
    fi
done

# GPU runtimes and CANN are not in this root: the plugins load and name the missing library.
for plugin in nvlink nvlink_intra hip ascend; do
    if ls "$debs"/transfer-engine-plugin-${plugin//_/-}_*.deb >/dev/null 2>&1; then
        grep -q "^$plugin .*library missing" /tmp/te-plugins.txt || fail "$plugin plugin should load and report its runtime library missing"
    fi
done
if ls "$debs"/transfer-engine-plugin-nvmeof_*.deb >/dev/null 2>&1; then
    # Without namespaces of its own the nvmeof plugin runs as a client; a configured but absent target is hardware absent.
    grep -q "^nvmeof .*available" /tmp/te-plugins.txt || fail "nvmeof plugin should load as a client"
    in_root env MC_NVMEOF_NAMESPACES=tcp://127.0.0.1:4420/nqn.2026-11.io.test:absent transfer-engine plugins | grep -q "^nvmeof .*hardware absent" \
        || fail "nvmeof with an unreachable target should report hardware absent"
fi

echo "== transfer-engine bench --loopback (TCP, P2PHANDSHAKE)"
in_root transfer-engine bench --loopback --block-sizes 4KiB,1MiB --batch-sizes 1,16 --duration 0.3 --verify --no-reference \
    > /tmp/te-bench.txt 2>&1 || { cat /tmp/te-bench.txt; fail "bench over tcp"; }
grep -E "protocol tcp|^(write|read) " /tmp/te-bench.txt
grep -q "protocol tcp" /tmp/te-bench.txt && ! grep -E "^(write|read) " /tmp/te-bench.txt | grep -qv " ok$" || fail "tcp bench did not verify"

echo "== MOONCAKE_PROTOCOL=efa over libfabric tcp;ofi_rxm: the plugin is loaded"
in_root env MOONCAKE_PROTOCOL=efa MC_EFA_PROVIDER='tcp;ofi_rxm' MC_STRICT_PROTOCOL=1 \
    transfer-engine bench --loopback --block-sizes 64KiB --batch-sizes 1,16 --duration 0.3 --verify --no-reference \
    > /tmp/te-bench-efa.txt 2>&1 || { cat /tmp/te-bench-efa.txt; fail "bench over efa"; }
grep -E "efa plugin: provider|protocol efa|^(write|read) " /tmp/te-bench-efa.txt
grep -q "protocol efa" /tmp/te-bench-efa.txt || fail "efa plugin not used"

echo "== python3 -c 'import transfer_engine'"
in_root python3 -c '
import transfer_engine
engine = transfer_engine.TransferEngine()
assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
print("python: engine on port", engine.get_rpc_port(), "using", transfer_engine.library_path)
' || fail "python package"

echo "== dpkg -r transfer-engine-plugin-efa, then MOONCAKE_PROTOCOL=efa falls back to TCP with one warning"
in_root dpkg -r transfer-engine-plugin-efa > /dev/null
in_root env MOONCAKE_PROTOCOL=efa MC_EFA_PROVIDER='tcp;ofi_rxm' \
    transfer-engine bench --loopback --block-sizes 4KiB --batch-sizes 1 --duration 0.2 --no-reference \
    > /tmp/te-bench-fallback.txt 2>&1 || { cat /tmp/te-bench-fallback.txt; fail "bench after removing the plugin"; }
grep "warning" /tmp/te-bench-fallback.txt
# Two engine processes (bench and its loopback target): exactly one warning line each.
[ "$(grep -c "warning" /tmp/te-bench-fallback.txt)" = 2 ] || fail "expected one warning per process"
[ "$(grep -c "protocol 'efa' is unavailable (no plugin file libtransport_efa.so" /tmp/te-bench-fallback.txt)" = 2 ] || fail "no fallback warning"
grep -q "protocol tcp" /tmp/te-bench-fallback.txt || fail "did not fall back to tcp"
echo "PASS: packages install and run in a Debian 12 root without the Swift toolchain"
