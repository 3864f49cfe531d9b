"""Builds the Swift C API library and bundles it, with the Swift runtime it needs,
into transfer_engine/_lib so the installed package does not depend on the
toolchain: every bundled ELF file has RUNPATH $ORIGIN.

`pip install ./python` and `python -m build --wheel python` both run this.
TRANSFER_ENGINE_SWIFT names the swift binary (default: swift on PATH)."""
import os
import shutil
import subprocess

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


class BuildSwiftLibrary(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "transfer_engine", "_lib")
        os.makedirs(target, exist_ok=True)
        swift = os.environ.get("TRANSFER_ENGINE_SWIFT", "swift")
        command = [swift, "build", "-c", "release", "--manifest-cache", "none", "--scratch-path", os.path.join(REPO, ".build-python"),
                   "--product", "transfer_engine_c", "--disable-local-rpath",
                   "-Xswiftc", "-no-toolchain-stdlib-rpath", "-Xlinker", "-rpath", "-Xlinker", "$ORIGIN"]
        subprocess.check_call(command, cwd=REPO)
        bin_path = subprocess.check_output(command + ["--show-bin-path"], cwd=REPO, text=True).strip().splitlines()[-1]
        library = os.path.join(bin_path, "libtransfer_engine_c.so")
        shutil.copy2(library, target)
        # The Swift runtime closure: NEEDED libraries found in the toolchain's runtime directory.
        runtime = os.path.join(os.path.dirname(os.path.realpath(shutil.which(swift) or swift)), "..", "lib", "swift", "linux")
        pending, seen = [library], set()
        while pending:
            for name in needed(pending.pop()):
                source = os.path.join(runtime, name)
                if name in seen or not os.path.exists(source):
                    continue
                seen.add(name)
                shutil.copy2(os.path.realpath(source), os.path.join(target, name))
                pending.append(source)


def needed(path):
    """The DT_NEEDED entries of an ELF file (readelf, from binutils)."""
    output = subprocess.check_output(["readelf", "-d", path], text=True)
    return [line.split("[", 1)[1].split("]", 1)[0] for line in output.splitlines() if "(NEEDED)" in line]


class BinaryDistribution(Distribution):
    """The wheel carries native libraries: mark it platform-specific."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildSwiftLibrary}, distclass=BinaryDistribution)
