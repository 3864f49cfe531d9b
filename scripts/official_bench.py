"""Reference figures from the official Mooncake engine (PyPI wheel), measured on
this machine in the same run as `transfer-engine bench`: an official initiator
against an official target process, TCP transport, P2PHANDSHAKE. By default the
cases of `transfer-engine bench`'s own default run (write and read, 4 KiB to
64 MiB, batches of 1 and 64), so every tcp row has the official figure beside it.

Usage: python official_bench.py [--duration SECONDS] [--block-sizes 4096,65536,...]
           [--batch-sizes 1,64] [--background-load N --load-bin PATH/transfer-engine]
With --background-load, every case is measured again right after, beside N busy
threads (`transfer-engine load`, the neighbour `transfer-engine bench --background-load`
uses), and the figures go under "loaded". Prints a table and one JSON line.
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
    """GB/s over the wall-clock time of the loop (as `transfer-engine bench` counts) and p50."""
    run()  # warm-up
    latencies = []
    start = time.perf_counter()
    end = start + duration
    while time.perf_counter() < end and len(latencies) < 200000:
        t0 = time.perf_counter()
        if run() != 0:
            raise RuntimeError("transfer failed")
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"gbps": bytes_per_call * len(latencies) / elapsed / 1e9,
            "p50_us": latencies[len(latencies) // 2] * 1e6, "iterations": len(latencies)}


class Neighbour:
    """`transfer-engine load --threads N`: busy threads beside the loaded pass."""

    def __init__(self, binary, threads, seconds):
        self.process = subprocess.Popen([binary, "load", "--threads", str(threads), "--seconds", str(max(1, int(seconds))),
                                         "--exit-on-stdin-close"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not self.process.stdout.readline().startswith("READY"):
            self.stop()
            raise RuntimeError("transfer-engine load did not start")

    def stop(self):
        self.process.stdin.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def size_name(block):
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if block >= scale and block % scale == 0:
            return f"{block // scale} {unit}"
    return f"{block} B"


def option(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main():
    duration = float(option("--duration", "1.0"))
    blocks = [int(b) for b in option("--block-sizes", "4096,65536,1048576,4194304,67108864").split(",")]
    batches = [int(b) for b in option("--batch-sizes", "1,64").split(",")]
    load_threads = int(option("--background-load", "0"))
    load_bin = option("--load-bin", "")
    if load_threads and not load_bin:
        sys.exit("--background-load needs --load-bin (the transfer-engine binary)")
    child = subprocess.Popen([sys.executable, __file__, "--target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _, segment, remote = child.stdout.readline().split()
        remote = int(remote)
        e = engine()
        local = e.allocate_managed_buffer(SIZE)
        t0 = time.perf_counter()
        if e.transfer_sync_write(segment, local, remote, 4096) != 0:
            raise RuntimeError("first transfer failed")
        results = {"first_operation_us": (time.perf_counter() - t0) * 1e6, "background_load_threads": load_threads}
        names = []
        for op in ("write", "read"):
            sync = e.transfer_sync_write if op == "write" else e.transfer_sync_read
            batched = e.batch_transfer_sync_write if op == "write" else e.batch_transfer_sync_read
            for block in blocks:
                for batch in batches:
                    if block * batch > SIZE:
                        continue
                    if batch == 1:
                        run = lambda b=block, f=sync: f(segment, local, remote, b)  # noqa: E731
                    else:
                        locals_ = [local + i * block for i in range(batch)]
                        remotes = [remote + i * block for i in range(batch)]
                        run = lambda b=block, n=batch, l=locals_, r=remotes, f=batched: f(segment, l, r, [b] * n)  # noqa: E731
                    name = f"{op} {size_name(block)} x{batch}"
                    names.append(name)
                    results[name] = measure(run, block * batch, duration)
                    if load_threads:
                        try:
                            neighbour = Neighbour(load_bin, load_threads, duration + 60)
                        except (OSError, RuntimeError) as error:  # the quiet figure stays
                            print(f"{name}: no loaded figure: {error}", file=sys.stderr)
                            continue
                        try:
                            results[name]["loaded"] = measure(run, block * batch, duration)
                        finally:
                            neighbour.stop()
        print("official Mooncake engine (same machine, TCP, official target)" + (f", loaded: beside {load_threads} busy threads" if load_threads else "") + ":")
        print(f"  first operation to a new peer: {results['first_operation_us']:.0f} us")
        for name in names:
            r = results[name]
            loaded = r.get("loaded")
            extra = f"   loaded {loaded['gbps']:7.3f} GB/s  p50 {loaded['p50_us']:9.1f} us" if loaded else ""
            print(f"  {name:<18} {r['gbps']:7.3f} GB/s  p50 {r['p50_us']:9.1f} us  ({r['iterations']} iterations){extra}")
        print(json.dumps(results))
    finally:
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    target() if "--target" in sys.argv else main()
