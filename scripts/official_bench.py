"""Reference figures from the official Mooncake engine (PyPI wheel), measured on
this machine in the same run as `transfer-engine bench`: an official initiator
against an official target process, TCP transport, P2PHANDSHAKE.

Usage: python official_bench.py [--duration SECONDS]   (prints a table and one JSON line)
"""
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("MC_FORCE_TCP", "1")
os.environ.setdefault("GLOG_minloglevel", "2")
from mooncake.engine import TransferEngine  # noqa: E402

SIZE = 256 << 20


def engine():
    e = TransferEngine()
    if e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        sys.exit("official engine failed to initialize")
    return e


def target():
    e = engine()
    address = e.allocate_managed_buffer(SIZE)
    print(f"READY 127.0.0.1:{e.get_rpc_port()} {address}", flush=True)
    sys.stdin.read()


def measure(run, bytes_per_call, duration):
    run()  # warm-up
    latencies = []
    end = time.perf_counter() + duration
    while time.perf_counter() < end and len(latencies) < 200000:
        t0 = time.perf_counter()
        if run() != 0:
            raise RuntimeError("transfer failed")
        latencies.append(time.perf_counter() - t0)
    latencies.sort()
    total = sum(latencies)
    return {"gbps": bytes_per_call * len(latencies) / total / 1e9,
            "p50_us": latencies[len(latencies) // 2] * 1e6, "iterations": len(latencies)}


def main():
    duration = float(sys.argv[sys.argv.index("--duration") + 1]) if "--duration" in sys.argv else 1.0
    child = subprocess.Popen([sys.executable, __file__, "--target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _, segment, remote = child.stdout.readline().split()
        remote = int(remote)
        e = engine()
        local = e.allocate_managed_buffer(SIZE)
        t0 = time.perf_counter()
        if e.transfer_sync_write(segment, local, remote, 4096) != 0:
            raise RuntimeError("first transfer failed")
        results = {"first_operation_us": (time.perf_counter() - t0) * 1e6}
        cases = [("write 4 KiB x1", 4096, 1), ("write 64 KiB x64", 65536, 64), ("write 1 MiB x1", 1 << 20, 1),
                 ("write 1 MiB x64", 1 << 20, 64), ("write 64 MiB x1", 64 << 20, 1)]
        for name, block, batch in cases:
            if batch == 1:
                run = lambda b=block: e.transfer_sync_write(segment, local, remote, b)  # noqa: E731
            else:
                locals_ = [local + i * block for i in range(batch)]
                remotes = [remote + i * block for i in range(batch)]
                run = lambda b=block, n=batch, l=locals_, r=remotes: e.batch_transfer_sync_write(segment, l, r, [b] * n)  # noqa: E731
            results[name] = measure(run, block * batch, duration)
        print("official Mooncake engine (same machine, TCP, official target):")
        print(f"  first operation to a new peer: {results['first_operation_us']:.0f} us")
        for name, _, _ in cases:
            r = results[name]
            print(f"  {name:<18} {r['gbps']:7.3f} GB/s  p50 {r['p50_us']:9.1f} us  ({r['iterations']} iterations)")
        print(json.dumps(results))
    finally:
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    target() if "--target" in sys.argv else main()
