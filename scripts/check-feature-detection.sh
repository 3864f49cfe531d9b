#!/usr/bin/env bash
# Checks that a plugin's optional support follows the headers installed now, not those present at
# an earlier build (the .deb once packed a hip plugin "built without libamdhip64-dev" because the
# header arrived after the first build). Builds as a machine without the header would (a private
# mount namespace hides /usr/include/hip), then normally, each after scripts/setup.sh as README's
# commands do, and asks `transfer-engine plugins` about hip. Needs root and libamdhip64-dev;
# scripts/test.sh runs it where both are there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "feature-detection check skipped: needs root (mount namespace)"; exit 0; }
[ -f /usr/include/hip/hip_runtime_api.h ] || { echo "feature-detection check skipped: libamdhip64-dev is not installed"; exit 0; }
bin=$(swift build --show-bin-path)
empty=$(mktemp -d)
trap 'rmdir "$empty"' EXIT
echo "== building with /usr/include/hip hidden"
rm -f "$bin/libtransport_hip.so"
unshare -m bash -c "mount --bind '$empty' /usr/include/hip && scripts/setup.sh --check >/dev/null 2>&1;
    swift build --manifest-cache none 2>&1 | grep -E 'error|complete' | tail -2"
if [ -e "$bin/libtransport_hip.so" ]; then echo "FAIL: a hip plugin was built without the HIP header" >&2; exit 1; fi
echo "== building with the header back"
scripts/setup.sh --check >/dev/null 2>&1
swift build --manifest-cache none 2>&1 | grep -E "error|complete" | tail -2
line=$(MC_TRANSPORT_PLUGIN_PATH="$bin" "$bin/transfer-engine" plugins 2>&1 | grep "libtransport_hip.so" || true)
echo "$line"
if [ -z "$line" ] || grep -q "built without libamdhip64-dev" <<<"$line"; then
    echo "FAIL: the hip plugin was not rebuilt with HIP support after the header came back" >&2
    exit 1
fi
echo "PASS: the hip plugin was rebuilt with HIP support"
