"""The `transfer-engine` console script: runs the CLI bundled in this package (the same binary
as the Debian package's /usr/bin/transfer-engine), which finds the bundled plugins next to it."""
import os
import sys


def main() -> None:
    """Replaces this process with the bundled `transfer-engine`, passing the arguments on."""
    binary = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib", "transfer-engine")
    if not os.access(binary, os.X_OK):
        sys.exit(f"transfer-engine: the CLI is not bundled in this installation ({binary} is missing); "
                 "install the wheel built by scripts/build-wheel.sh or `pip install ./python`")
    os.execv(binary, [binary] + sys.argv[1:])
