"""Benchmark of the Python package: the same table as `transfer-engine bench`.

Starts a target process (this script with --target), then measures synchronous
and batched reads and writes through TransferEngine.

  python python/bench.py [--block-sizes 4096,65536,1048576] [--batch-sizes 1,64] [--duration 1] [--json FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from transfer_engine import TransferEngine  # noqa: E402

BUFFER = 256 << 20


def target():
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    address = engine.allocate_managed_buffer(BUFFER)
    print(f"READY 127.0.0.1:{engine.get_rpc_port()} {address}", flush=True)
    sys.stdin.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-sizes", default="4096,65536,1048576,67108864")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--operation", choices=["read", "write", "both"], default="both")
    parser.add_argument("--duration", type=float, default=1.0)
    parser.add_argument("--max-iterations", type=int, default=200000)
    parser.add_argument("--json")
    parser.add_argument("--target", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.target:
        return target()
    child = subprocess.Popen([sys.executable, __file__, "--target"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        _, segment, remote = child.stdout.readline().split()
        remote = int(remote)
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        local = engine.allocate_managed_buffer(BUFFER)
        operations = ["write", "read"] if args.operation == "both" else [args.operation]
        rows = []
        for op in operations:
            for block in [int(x) for x in args.block_sizes.split(",")]:
                for batch in [int(x) for x in args.batch_sizes.split(",")]:
                    if block * batch > BUFFER:
                        continue
                    locals_ = [local + i * block for i in range(batch)]
                    remotes = [remote + i * block for i in range(batch)]
                    if batch == 1:
                        call = engine.transfer_sync_write if op == "write" else engine.transfer_sync_read
                        run = lambda call=call, block=block: call(segment, local, remote, block)  # noqa: E731
                    else:
                        call = engine.batch_transfer_sync_write if op == "write" else engine.batch_transfer_sync_read
                        run = lambda call=call, l=locals_, r=remotes, n=batch, b=block: call(segment, l, r, [b] * n)  # noqa: E731
                    assert run() == 0
                    latencies = []
                    end = time.perf_counter() + args.duration
                    while len(latencies) < args.max_iterations:
                        t0 = time.perf_counter()
                        assert run() == 0
                        t1 = time.perf_counter()
                        latencies.append(t1 - t0)
                        if t1 >= end:
                            break
                    latencies.sort()
                    total = sum(latencies)
                    rows.append({"operation": op, "block_size": block, "batch_size": batch,
                                 "gbps": block * batch * len(latencies) / total / 1e9,
                                 "p50_us": latencies[len(latencies) // 2] * 1e6,
                                 "p99_us": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e6,
                                 "iterations": len(latencies)})
        header = ["op", "block", "batch", "GB/s", "p50 us", "p99 us", "iterations"]
        table = [[r["operation"], str(r["block_size"]), str(r["batch_size"]), f"{r['gbps']:.3f}", f"{r['p50_us']:.1f}",
                  f"{r['p99_us']:.1f}", str(r["iterations"])] for r in rows]
        widths = [max(len(x[i]) for x in [header] + table) for i in range(len(header))]
        for line in [header, ["-" * w for w in widths]] + table:
            print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"segment": segment, "results": rows}, f, indent=2)
    finally:
        child.stdin.close()
        child.wait(timeout=30)


if __name__ == "__main__":
    main()
