"""Bundles the engine into the package: the C API library, the `transfer-engine` CLI, every
transport plugin this machine built, and the Swift runtime they need, all in transfer_engine/_lib
with RUNPATH $ORIGIN, so the installed package needs no toolchain. The engine finds the plugins
next to its own image; the `transfer-engine` console script runs the bundled CLI.

`pip install ./python`, `pip wheel ./python` and `python -m build --wheel python` run this;
scripts/build-wheel.sh adds auditwheel's manylinux repair. The binaries come from the repository's
release build (`swift build -c release`, which scripts/bench.sh also makes); TRANSFER_ENGINE_SWIFT
names the swift binary (default: swift on PATH). The version is the one in Version.swift."""
import os
import re
import shutil
import subprocess

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def version():
    """The project's single version (Sources/TransferEngine/Support/Version.swift)."""
    with open(os.path.join(REPO, "Sources", "TransferEngine", "Support", "Version.swift")) as source:
        return re.search(r'static let string = "([^"]+)"', source.read()).group(1)


def needed(path):
    """The DT_NEEDED entries of an ELF file (readelf, from binutils)."""
    output = subprocess.check_output(["readelf", "-d", path], text=True)
    return [line.split("[", 1)[1].split("]", 1)[0] for line in output.splitlines() if "(NEEDED)" in line]


class BuildSwiftLibrary(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "transfer_engine", "_lib")
        os.makedirs(target, exist_ok=True)
        swift = os.environ.get("TRANSFER_ENGINE_SWIFT", "swift")
        command = [swift, "build", "-c", "release", "--manifest-cache", "none"]
        subprocess.check_call(command, cwd=REPO)
        bin_path = subprocess.check_output(command + ["--show-bin-path"], cwd=REPO, text=True).strip().splitlines()[-1]
        products = ["libtransfer_engine_c.so", "transfer-engine"]
        products += sorted(name for name in os.listdir(bin_path) if re.fullmatch(r"libtransport_\w+\.so", name))
        copied = []
        for name in products:
            shutil.copy2(os.path.join(bin_path, name), os.path.join(target, name))
            copied.append(os.path.join(target, name))
        # The Swift runtime closure: NEEDED libraries found in the toolchain's runtime directory.
        runtime = os.path.join(os.path.dirname(os.path.realpath(shutil.which(swift) or swift)), "..", "lib", "swift", "linux")
        pending, seen = list(copied), set()
        while pending:
            for name in needed(pending.pop()):
                source = os.path.join(runtime, name)
                if name in seen or not os.path.exists(source):
                    continue
                seen.add(name)
                shutil.copy2(os.path.realpath(source), os.path.join(target, name))
                copied.append(os.path.join(target, name))
                pending.append(source)
        for path in copied:
            # Relative RUNPATH only (the release build points into the toolchain); stripped as a
            # Debian package would be (the runtime's debug sections are most of its size).
            subprocess.check_call(["patchelf", "--set-rpath", "$ORIGIN", path])
            subprocess.check_call(["strip", "--strip-unneeded", "--remove-section=.comment", path])
        os.chmod(os.path.join(target, "transfer-engine"), 0o755)


class BinaryDistribution(Distribution):
    """The wheel carries native code: mark it platform-specific."""

    def has_ext_modules(self):
        return True


class PurePythonABIWheel(bdist_wheel):
    """No CPython extension module: the library is loaded with ctypes, so any Python 3 can use the
    wheel (py3-none-<platform>; auditwheel then narrows the platform to manylinux)."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(version=version(), cmdclass={"build_py": BuildSwiftLibrary, "bdist_wheel": PurePythonABIWheel},
      distclass=BinaryDistribution)
