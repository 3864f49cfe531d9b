"""`pip install ./python` into a fresh virtual environment: the installed package
carries libtransfer_engine_c.so and the Swift runtime with RUNPATH $ORIGIN, loads
them from site-packages (not from the toolchain), and moves bytes."""
import os
import subprocess
import sys

import pytest

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import os, transfer_engine as t
assert os.sep + '_lib' + os.sep in t.library_path, t.library_path
a, b = t.TransferEngine(), t.TransferEngine()
assert a.initialize('127.0.0.1', 'P2PHANDSHAKE', 'tcp', '') == 0 and b.initialize('127.0.0.1', 'P2PHANDSHAKE', 'tcp', '') == 0
x, y = a.allocate_managed_buffer(1 << 20), b.allocate_managed_buffer(1 << 20)
b.write_bytes_to_buffer(y, os.urandom(1 << 20), 1 << 20)
assert b.transfer_sync_write('127.0.0.1:%d' % a.get_rpc_port(), y, x, 1 << 20) == 0
assert a.read_bytes_from_buffer(x, 1 << 20) == b.read_bytes_from_buffer(y, 1 << 20)
print('installed package ok:', t.library_path)
"""


@pytest.mark.skipif(os.environ.get("TE_SKIP_PACKAGING") == "1", reason="TE_SKIP_PACKAGING=1")
def test_pip_install_bundles_the_runtime(tmp_path):
    venv = tmp_path / "venv"
    subprocess.check_call([sys.executable, "-m", "venv", str(venv)])
    python = str(venv / "bin" / "python")
    subprocess.check_call([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", PYTHON_DIR], timeout=1200)
    site = subprocess.check_output([python, "-c", "import transfer_engine, os; print(os.path.dirname(transfer_engine.__file__))"],
                                   cwd=tmp_path, text=True, env={k: v for k, v in os.environ.items() if k != "TRANSFER_ENGINE_LIBRARY"}).strip()
    lib = os.path.join(site, "_lib")
    files = sorted(os.listdir(lib))
    assert "libtransfer_engine_c.so" in files and "libswiftCore.so" in files, files
    for name in files:
        dynamic = subprocess.check_output(["readelf", "-d", os.path.join(lib, name)], text=True)
        paths = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "RUNPATH" in line or "RPATH" in line]
        assert all(p == "$ORIGIN" for p in paths), f"{name}: {paths}"
    resolved = subprocess.check_output(["ldd", os.path.join(lib, "libtransfer_engine_c.so")], text=True)
    for line in resolved.splitlines():
        if "libswift" in line or "Foundation" in line or "dispatch" in line:
            assert lib in line, line
        assert "not found" not in line, line
    environment = {k: v for k, v in os.environ.items() if k != "TRANSFER_ENGINE_LIBRARY"}
    out = subprocess.check_output([python, "-c", CHECK], cwd=tmp_path, text=True, env=environment, timeout=120)
    assert "installed package ok" in out


REPO = os.path.dirname(PYTHON_DIR)


@pytest.mark.skipif(os.environ.get("TE_SKIP_PACKAGING") == "1", reason="TE_SKIP_PACKAGING=1")
def test_manylinux_wheel_runs_without_the_toolchain(tmp_path):
    """scripts/build-wheel.sh's wheel in a fresh venv whose PATH has no Swift toolchain: the console
    script lists the bundled plugins and runs a verified loopback benchmark; Python moves bytes."""
    out = tmp_path / "wheel"
    subprocess.check_call([os.path.join(REPO, "scripts", "build-wheel.sh"), str(out)], cwd=REPO, timeout=1800)
    wheels = [name for name in os.listdir(out) if name.endswith(".whl")]
    assert len(wheels) == 1 and "-py3-none-manylinux_2_" in wheels[0] and wheels[0].endswith("_x86_64.whl"), wheels
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    venv = tmp_path / "venv"
    subprocess.check_call(["/usr/bin/python3", "-m", "venv", str(venv)], env=bare)
    python, cli = str(venv / "bin" / "python"), str(venv / "bin" / "transfer-engine")
    subprocess.check_call([python, "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check", str(out / wheels[0])],
                          env=bare, timeout=300)
    site = subprocess.check_output([python, "-c", "import transfer_engine, os; print(os.path.dirname(transfer_engine.__file__))"],
                                   cwd=tmp_path, env=bare, text=True).strip()
    assert os.path.exists(os.path.join(site, "py.typed")) and os.path.exists(os.path.join(site, "__init__.pyi"))
    plugins = subprocess.run([cli, "plugins"], cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=60)
    assert plugins.returncode == 0, plugins.stderr
    bundled = os.path.join(site, "_lib", "libtransport_shm.so")
    assert any(line.startswith("shm ") and bundled in line and "available" in line for line in plugins.stdout.splitlines()), plugins.stdout
    bench = subprocess.run([cli, "bench", "--loopback", "--block-sizes", "4KiB,1MiB", "--batch-sizes", "1,8", "--duration", "0.2",
                            "--verify", "--no-reference"], cwd=tmp_path, env=bare, capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    rows = [line for line in bench.stdout.splitlines() if line.startswith(("write ", "read "))]
    assert rows and all(line.rstrip().endswith("ok") for line in rows), bench.stdout
    out_text = subprocess.check_output([python, "-c", CHECK], cwd=tmp_path, env=bare, text=True, timeout=120)
    assert "installed package ok" in out_text and site in out_text
