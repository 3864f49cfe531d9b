#!/usr/bin/env bash
# Runs the whole test suite. This is the test command README.md gives and .ci/run calls.
# --manifest-cache none: plugin targets depend on which -dev headers are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v swift >/dev/null || { echo "error: swift is not on PATH (Swift 6 toolchain expected, e.g. /opt/swift/usr/bin)" >&2; exit 1; }
command -v cc >/dev/null || { echo "error: a C compiler (cc) is needed to build the ABI fixture plugins: apt-get install gcc libc6-dev" >&2; exit 1; }
exec swift test --manifest-cache none "$@"
