"""A second process for the pytest suite: a target engine that serves a buffer.

Usage: peer.py SIZE [PROTOCOL]. Prints "READY <segment> <address>", then answers stdin lines:
  read ADDRESS LENGTH  -> hex of those bytes
  notifies             -> JSON list of [name, msg]
  heap LENGTH          -> address of heap memory (not a managed buffer), filled and registered
  unregister ADDRESS   -> unregister_memory's return code
  quit
"""
import ctypes
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transfer_engine import TransferEngine  # noqa: E402

engine = TransferEngine()
assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", sys.argv[2] if len(sys.argv) > 2 else "tcp", "") == 0
size = int(sys.argv[1])
address = engine.allocate_managed_buffer(size)
engine.write_bytes_to_buffer(address, bytes(i % 251 for i in range(size)), size)
print(f"READY 127.0.0.1:{engine.get_rpc_port()} {address}", flush=True)
kept = []
for line in sys.stdin:
    words = line.split()
    if not words or words[0] == "quit":
        break
    if words[0] == "read":
        print(engine.read_bytes_from_buffer(int(words[1]), int(words[2])).hex(), flush=True)
    elif words[0] == "heap":
        length = int(words[1])
        heap = ctypes.create_string_buffer(bytes(i % 251 for i in range(length)), length)
        kept.append(heap)
        assert engine.register_memory(ctypes.addressof(heap), length) == 0
        print(ctypes.addressof(heap), flush=True)
    elif words[0] == "unregister":
        print(engine.unregister_memory(int(words[1])), flush=True)
    elif words[0] == "notifies":
        print(json.dumps([[n.name, n.msg] for n in engine.get_notifies()]), flush=True)
