#!/usr/bin/env bash
# Builds the Debian packages from this checkout:
#   transfer-engine_<version>_<arch>.deb                 CLI, C API library (SONAME libtransfer_engine_c.so.0),
#                                                        Swift runtime, metadata-server systemd unit (disabled)
#   transfer-engine-dev_<version>_<arch>.deb             C header, libtransfer_engine_c.so link, pkg-config file
#   python3-transfer-engine_<version>_all.deb            the Python package
#   transfer-engine-plugin-<protocol>_<version>_<arch>.deb  one per transport plugin that built here
# into out/debs/ (or $1). The version comes from Sources/TransferEngine/Support/Version.swift.
# Needs: the Swift toolchain, dpkg-dev (dpkg-shlibdeps), patchelf, file; lintian runs when installed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
dest=$(realpath -m "${1:-out/debs}")
version=$(sed -n 's/.*static let string = "\(.*\)".*/\1/p' Sources/TransferEngine/Support/Version.swift)
arch=$(dpkg --print-architecture)
maintainer="Swift Transfer Engine developers <transfer-engine@example.org>"
[ -n "$version" ] || { echo "error: no version in Version.swift" >&2; exit 1; }
for tool in patchelf dpkg-shlibdeps dpkg-deb file; do
    command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install patchelf dpkg-dev file)" >&2; exit 1; }
done

echo "== building release binaries (version $version)"
swift build -c release --manifest-cache none 2>&1 | grep -E "error|warning:|Build complete" | tail -3
bin=$(swift build -c release --show-bin-path)
toolchain_lib=$(dirname "$(command -v swift)")/../lib/swift/linux
toolchain_lib=$(realpath "$toolchain_lib")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$dest"
mkdir -p "$dest"
private=usr/lib/transfer-engine

# Swift runtime libraries an ELF file needs, transitively, from the toolchain directory.
runtime_closure() {
    local queue=("$@") seen=" " file lib
    while [ ${#queue[@]} -gt 0 ]; do
        file=${queue[0]}
        queue=("${queue[@]:1}")
        for lib in $(readelf -d "$file" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p'); do
            if [ -f "$toolchain_lib/$lib" ] && [[ "$seen" != *" $lib "* ]]; then
                seen+="$lib "
                queue+=("$toolchain_lib/$lib")
            fi
        done
    done
    echo "$seen"
}

# Relative RUNPATH only; strip like dh_strip.
fix_elf() {  # file runpath
    patchelf --set-rpath "$2" "$1"
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$1"
    chmod 0644 "$1"
}

# Depends computed from what the ELF files really link (the private Swift runtime excluded).
shlib_depends() {  # stage-dir files...
    local stage=$1
    shift
    mkdir -p "$work/shlibs/debian"
    printf 'Source: transfer-engine\n\nPackage: transfer-engine\nArchitecture: any\n' > "$work/shlibs/debian/control"
    (cd "$work/shlibs" && dpkg-shlibdeps -O --ignore-missing-info -l"$stage/$private/swift" -l"$repo/$private/swift" "$@" 2>/dev/null) |
        sed -n 's/^shlibs:Depends=//p'
}

write_docs() {  # stage package
    local doc=$1/usr/share/doc/$2
    mkdir -p "$doc"
    cp packaging/copyright "$doc/copyright"
    printf '%s (%s) unstable; urgency=medium\n\n  * Built from the repository (packaging/build-debs.sh).\n\n -- %s  %s\n' \
        "$2" "$version" "$maintainer" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" |
        gzip -9n > "$doc/changelog.gz"
    if [ -f "packaging/lintian/$2" ]; then
        mkdir -p "$1/usr/share/lintian/overrides"
        cp "packaging/lintian/$2" "$1/usr/share/lintian/overrides/$2"
    fi
}

build_deb() {  # stage package depends short-description long-description [architecture]
    local stage=$1 package=$2 architecture=${6:-$arch}
    mkdir -p "$stage/DEBIAN"
    # Conffiles (under etc/) are listed as such, not in md5sums.
    (cd "$stage" && find usr $([ -d lib ] && echo lib) -type f -print0 | sort -z | xargs -0 -r md5sum > DEBIAN/md5sums)
    if [ -d "$stage/etc" ]; then (cd "$stage" && find etc -type f | sort | sed 's|^|/|') > "$stage/DEBIAN/conffiles"; fi
    {
        echo "Package: $package"
        echo "Version: $version"
        echo "Architecture: $architecture"
        echo "Maintainer: $maintainer"
        echo "Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
        echo "Depends: $3"
        [ -z "${recommends:-}" ] || echo "Recommends: $recommends"
        echo "Section: net"
        echo "Priority: optional"
        echo "Homepage: https://github.com/kvcache-ai/Mooncake"
        echo "Description: $4"
        echo "$5" | fold -s -w 78 | sed 's/^/ /; s/ *$//'
    } > "$stage/DEBIAN/control"
    find "$stage" -type d -exec chmod 0755 {} +
    dpkg-deb --build --root-owner-group -Zxz "$stage" "$dest/${package}_${version}_${architecture}.deb" >/dev/null
    echo "   $dest/${package}_${version}_${architecture}.deb"
}

echo "== staging the host package"
host=$work/transfer-engine
soname=libtransfer_engine_c.so.0
mkdir -p "$host/usr/bin" "$host/$private/swift" "$host/$private/plugins" "$host/usr/share/man/man1" \
    "$host/lib/systemd/system" "$host/etc/transfer-engine"
install -m 0755 "$bin/transfer-engine" "$host/usr/bin/transfer-engine"
install -m 0644 "$bin/libtransfer_engine_c.so" "$host/$private/$soname"
patchelf --set-soname "$soname" "$host/$private/$soname"
# The metadata server as a service, installed disabled (no maintainer script enables it).
install -m 0644 packaging/systemd/transfer-engine-metadata.service "$host/lib/systemd/system/"
install -m 0644 packaging/etc/metadata-server.env "$host/etc/transfer-engine/"
# The C API library is found by its SONAME at run time without an rpath (programs built the way
# NIXL's Mooncake backend is: -ltransfer_engine from the default paths); dpkg runs ldconfig.
mkdir -p "$host/etc/ld.so.conf.d" "$host/DEBIAN"
echo "/$private" > "$host/etc/ld.so.conf.d/transfer-engine.conf"
echo "activate-noawait ldconfig" > "$host/DEBIAN/triggers"
plugins=("$bin"/libtransport_*.so)
for lib in $(runtime_closure "$bin/transfer-engine" "$bin/libtransfer_engine_c.so" "${plugins[@]}"); do
    install -m 0644 "$toolchain_lib/$lib" "$host/$private/swift/$lib"
    fix_elf "$host/$private/swift/$lib" '$ORIGIN'
done
fix_elf "$host/usr/bin/transfer-engine" '$ORIGIN/../lib/transfer-engine/swift'
chmod 0755 "$host/usr/bin/transfer-engine"
fix_elf "$host/$private/$soname" '$ORIGIN/swift'
# The manual page comes from the CLI's own --help text (swift-argument-parser's generate-manual).
mkdir -p "$work/man"
swift package --allow-writing-to-directory "$work/man" generate-manual --output-directory "$work/man" >/dev/null
sed '/^$/d' "$work/man/transfer-engine.1" | gzip -9n > "$host/usr/share/man/man1/transfer-engine.1.gz"
write_docs "$host" transfer-engine
depends=$(shlib_depends "$host" "$host/usr/bin/transfer-engine" "$host/$private/$soname" "$host/$private/swift/"*.so)
build_deb "$host" transfer-engine "$depends" \
    "Mooncake-compatible transfer engine (host, CLI, C API)" \
    "Moves memory between processes and machines for LLM inference systems (KV-cache transfer), compatible with the Mooncake Transfer Engine's TCP wire format, metadata and APIs. TCP is built in; hardware transports come as separate transfer-engine-plugin-<protocol> packages found in /usr/lib/transfer-engine/plugins. Contains the transfer-engine command, the C API library, the Swift runtime libraries they need (in a private directory) and a systemd unit for the HTTP metadata server (transfer-engine-metadata, disabled until enabled; settings in /etc/transfer-engine/metadata-server.env)."

echo "== staging transfer-engine-dev"
dev=$work/transfer-engine-dev
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH)
mkdir -p "$dev/usr/include/transfer-engine" "$dev/$private" "$dev/usr/lib/$multiarch/pkgconfig"
install -m 0644 Sources/CTransferEngineC/include/transfer_engine_c.h "$dev/usr/include/transfer-engine/"
# For plugin authors: the plugin ABI header and the example plugin (`transfer-engine plugins --check` checks it).
install -m 0644 Sources/CTransportABI/include/te_transport_abi.h "$dev/usr/include/transfer-engine/"
install -D -m 0644 Plugins/Example/loopback_plugin.c "$dev/usr/share/doc/transfer-engine-dev/examples/loopback_plugin.c"
ln -s "$soname" "$dev/$private/libtransfer_engine_c.so"
# Upstream's names in the default paths: -ltransfer_engine and #include "transfer_engine_c.h" (NIXL).
ln -s "../transfer-engine/$soname" "$dev/usr/lib/$multiarch/libtransfer_engine.so"
ln -s transfer-engine/transfer_engine_c.h "$dev/usr/include/transfer_engine_c.h"
cat > "$dev/usr/lib/$multiarch/pkgconfig/transfer-engine.pc" <<PC
prefix=/usr
includedir=\${prefix}/include/transfer-engine
libdir=\${prefix}/lib/transfer-engine

Name: transfer-engine
Description: C API of the Mooncake-compatible transfer engine (transfer_engine_c.h)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -Wl,-rpath,\${libdir} -ltransfer_engine_c
PC
write_docs "$dev" transfer-engine-dev
build_deb "$dev" transfer-engine-dev "transfer-engine (= $version)" \
    "Mooncake-compatible transfer engine (C development files)" \
    "The C API header transfer_engine_c.h (upstream's names, types and return codes), the libtransfer_engine_c.so link for the linker and a pkg-config file: cc prog.c \$(pkg-config --cflags --libs transfer-engine). For transport plugin authors: the plugin ABI header te_transport_abi.h and an example plugin in C (examples/loopback_plugin.c); check a plugin with transfer-engine plugins --check libtransport_NAME.so."

echo "== staging python3-transfer-engine"
python=$work/python3-transfer-engine
mkdir -p "$python/usr/lib/python3/dist-packages/transfer_engine"
install -m 0644 python/transfer_engine/*.py "$python/usr/lib/python3/dist-packages/transfer_engine/"
write_docs "$python" python3-transfer-engine
build_deb "$python" python3-transfer-engine "python3, transfer-engine (= $version)" \
    "Python binding of the Swift transfer engine" \
    "The transfer_engine module: a TransferEngine class with the methods of mooncake.engine.TransferEngine, over the engine's C API library (/usr/lib/transfer-engine/libtransfer_engine_c.so.0)." all

for plugin in "${plugins[@]}"; do
    name=$(basename "$plugin" .so)
    protocol=${name#libtransport_}
    package=transfer-engine-plugin-${protocol//_/-}
    echo "== staging $package"
    stage=$work/$package
    mkdir -p "$stage/$private/plugins"
    install -m 0644 "$plugin" "$stage/$private/plugins/$name.so"
    fix_elf "$stage/$private/plugins/$name.so" '$ORIGIN/../swift'
    write_docs "$stage" "$package"
    libs=$(shlib_depends "$host" "$stage/$private/plugins/$name.so")
    # Runtimes bound with dlopen are invisible to dpkg-shlibdeps. Without them the plugin loads and
    # says "library missing", so they are recommended rather than required (libcuda comes with
    # NVIDIA's driver and CANN with Huawei's toolkit, both outside Debian).
    case $protocol in
        hip) recommends="libamdhip64-5 | libamdhip64-6" ;;
        *) recommends="" ;;
    esac
    build_deb "$stage" "$package" "transfer-engine (= $version)${libs:+, $libs}" \
        "$protocol transport plugin for the Swift transfer engine" \
        "Loaded by the transfer-engine host at run time when MOONCAKE_PROTOCOL (or the protocol setting) is $protocol. Without its hardware the plugin reports why and the engine falls back to TCP."
done

echo "== checking RUNPATHs (relative only, nothing in the toolchain)"
for deb in "$dest"/*.deb; do
    mkdir -p "$work/check" && dpkg-deb -x "$deb" "$work/check"
done
while IFS= read -r -d '' elf; do
    file -b "$elf" | grep -q ELF || continue
    runpath=$(readelf -d "$elf" | sed -n 's/.*R\(UN\)\{0,1\}PATH.*\[\(.*\)\]/\2/p')
    case "$runpath" in
        ''|'$ORIGIN'*) ;;
        *) echo "error: $elf has RUNPATH $runpath" >&2; exit 1 ;;
    esac
    if readelf -d "$elf" | grep -q "$toolchain_lib"; then echo "error: $elf points into $toolchain_lib" >&2; exit 1; fi
done < <(find "$work/check" -type f -print0)

if command -v lintian >/dev/null; then
    echo "== lintian"
    lintian --fail-on error,warning "$dest"/*.deb
fi
ls -l "$dest"
