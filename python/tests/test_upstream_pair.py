"""Upstream's own Python test pair (see upstream/README.md) against this package: the target
script in the background, then the initiator's unittest suite, under P2PHANDSHAKE and under our
HTTP metadata server, as upstream's CI runs them."""
import os
import random
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
UPSTREAM = os.path.join(HERE, "upstream")
PACKAGE_ROOT = os.path.dirname(HERE)


def free_port():
    """A free loopback port outside the engine's listener range (15000-17000) and the ephemeral range."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port in 20000-29999")


def wait_for_line(process, text, timeout):
    """Reads the process's output until a line contains `text`; returns what was read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no '{text}' within {timeout} s; output: {''.join(seen)!r}")


def cli_path():
    library = os.environ.get("TRANSFER_ENGINE_LIBRARY", "")
    path = os.path.join(os.path.dirname(library), "transfer-engine") if library else ""
    return path if os.access(path, os.X_OK) else None


@pytest.mark.parametrize("metadata", ["P2PHANDSHAKE", "http"])
def test_upstream_pair(metadata):
    processes = []
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({"TARGET_SERVER_NAME": f"127.0.0.1:{free_port()}", "INITIATOR_SERVER_NAME": f"127.0.0.1:{free_port()}",
                "MC_FORCE_TCP": "true", "PROTOCOL": "tcp", "CIRCLE": "1000", "PYTHONUNBUFFERED": "1"})
    try:
        if metadata == "http":
            cli = cli_path()
            if cli is None:
                pytest.skip("the transfer-engine CLI is not next to TRANSFER_ENGINE_LIBRARY (scripts/test.sh sets it)")
            server = subprocess.Popen([cli, "metadata-server", "--host", "127.0.0.1", "--port", str(free_port())],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            processes.append(server)
            ready = wait_for_line(server, "READY metadata-server", 30)[-1]
            env["MC_METADATA_SERVER"] = ready.split()[-1]
        else:
            env["MC_METADATA_SERVER"] = "P2PHANDSHAKE"
        target = subprocess.Popen([sys.executable, os.path.join(UPSTREAM, "transfer_engine_target.py")], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(target)
        wait_for_line(target, "Target server ready", 60)
        result = subprocess.run([sys.executable, os.path.join(UPSTREAM, "transfer_engine_initiator_test.py")], env=env,
                                capture_output=True, text=True, timeout=600)
        report = result.stdout + result.stderr
        assert result.returncode == 0, report
        with open(os.path.join(UPSTREAM, "transfer_engine_initiator_test.py")) as source:
            count = sum(1 for line in source if line.lstrip().startswith("def test_"))
        assert f"Ran {count} tests" in report and "\nOK" in report, report
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=30)
