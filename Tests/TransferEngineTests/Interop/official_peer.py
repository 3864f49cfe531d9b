"""Drives the official Mooncake engine (PyPI wheel) against this engine in interop tests.

  Environment: TE_INTEROP_METADATA (default P2PHANDSHAKE; e.g. http://127.0.0.1:P/metadata)
  and TE_INTEROP_NAME (local_hostname, the segment name with a metadata server).

  official_peer.py target SIZE
      Registers SIZE bytes filled with pattern(seed=1), prints
      READY <segment> <address>, then answers stdin lines:
        crc ADDRESS LENGTH   -> zlib.crc32 of that memory, in decimal
        quit
  official_peer.py initiator SEGMENT REMOTE_ADDRESS SIZE
      Writes pattern(seed=2) into the segment, reads it back, writes it in 8
      batched chunks, probes and notifies the segment, and prints one JSON line.
"""
import hashlib
import json
import os
import sys
import zlib

os.environ.setdefault("MC_FORCE_TCP", "1")
from mooncake.engine import TransferEngine, TransferNotify, TransferOpcode  # noqa: E402


def pattern(size, seed):
    period = bytes(((i * 131 + seed) % 251) for i in range(251))
    return (period * (size // 251 + 1))[:size]


METADATA = os.environ.get("TE_INTEROP_METADATA", "P2PHANDSHAKE")
NAME = os.environ.get("TE_INTEROP_NAME", "127.0.0.1")


def start():
    engine = TransferEngine()
    rc = engine.initialize(NAME, METADATA, "tcp", "")
    if rc != 0:
        print(f"ERROR initialize {rc}", flush=True)
        sys.exit(1)
    return engine


def target(size):
    engine = start()
    address = engine.allocate_managed_buffer(size)
    engine.write_bytes_to_buffer(address, pattern(size, 1), size)
    segment = f"127.0.0.1:{engine.get_rpc_port()}" if METADATA == "P2PHANDSHAKE" else NAME
    print(f"READY {segment} {address}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        if words[0] == "crc":
            data = engine.read_bytes_from_buffer(int(words[1]), int(words[2]))
            print(zlib.crc32(data), flush=True)


def initiator(segment, remote, size):
    engine = start()
    local = engine.allocate_managed_buffer(size)
    back = engine.allocate_managed_buffer(size)
    data = pattern(size, 2)
    engine.write_bytes_to_buffer(local, data, size)
    result = {"expected_sha256": hashlib.sha256(data).hexdigest()}
    result["write"] = engine.transfer_sync_write(segment, local, remote, size)
    result["read"] = engine.transfer_sync_read(segment, back, remote, size)
    result["read_sha256"] = hashlib.sha256(engine.read_bytes_from_buffer(back, size)).hexdigest()
    chunk = size // 8
    result["batch_write"] = engine.batch_transfer_sync_write(
        segment, [local + i * chunk for i in range(8)], [remote + i * chunk for i in range(8)], [chunk] * 8)
    result["first_buffer"] = engine.get_first_buffer_address(segment)
    result["probe"] = engine.send_probe(segment)
    result["notify"] = engine.transfer_sync(segment, local, remote, 16, TransferOpcode.Write,
                                            TransferNotify("interop", "hello from the official engine"))
    result["out_of_range"] = engine.transfer_sync_write(segment, local, remote + size - 8, 64)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "target":
        target(int(sys.argv[2]))
    else:
        initiator(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
