#!/usr/bin/env python3
"""Checks this engine behind NIXL's Mooncake backend through NIXL's own agent API.

Needs a NIXL Python install whose plugin directory holds the Mooncake backend
(libplugin_Mooncake.so, built by NIXL against transfer_engine_c.h and linked with
-ltransfer_engine) and this engine's libtransfer_engine.so on the loader path. This script
builds nothing; it drives what is installed:

    NIXL_PLUGIN_DIR=/path/to/nixl/plugins python3 scripts/nixl_agent_check.py

Two agents in one process, each with a Mooncake backend (so each owns one engine), exchange
their metadata, register numpy buffers, then WRITE and READ blocks of the other agent's buffer
with a notification each time; every byte and every notification is checked. Traffic stays on
loopback: NIXL_MOONCAKE_IP_ADDR is set to 127.0.0.1 unless already set (the backend otherwise
publishes the first non-loopback address). Exit status 0 when everything arrived."""
import argparse
import os
import sys
import time

os.environ.setdefault("NIXL_MOONCAKE_IP_ADDR", "127.0.0.1")


def fail(message: str) -> None:
    print(f"nixl_agent_check: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def wait_done(agent, handle, deadline: float) -> None:
    while True:
        state = agent.check_xfer_state(handle)
        if state == "DONE":
            return
        if state == "ERR":
            fail("the transfer ended in error")
        if time.monotonic() > deadline:
            fail("the transfer did not finish in time")
        time.sleep(0.0001)


def wait_notification(agent, sender: str, message: bytes, deadline: float) -> None:
    while time.monotonic() < deadline:
        notes = agent.get_new_notifs()
        if sender in notes:
            if notes[sender] != [message]:
                fail(f"notification {notes[sender]!r}, expected [{message!r}]")
            return
        time.sleep(0.001)
    fail(f"no notification from {sender}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=64, help="blocks per transfer (default 64)")
    parser.add_argument("--block-size", type=int, default=65536, help="bytes per block (default 65536)")
    parser.add_argument("--rounds", type=int, default=10, help="WRITE+READ rounds (default 10)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds for the whole check (default 30)")
    args = parser.parse_args()
    if args.blocks < 1 or args.block_size < 1 or args.rounds < 1 or not args.timeout > 0:
        parser.error("--blocks, --block-size, --rounds and --timeout must be positive")
    if not os.environ.get("NIXL_PLUGIN_DIR"):
        print("nixl_agent_check: NIXL_PLUGIN_DIR is not set; NIXL looks in its default plugin directory", file=sys.stderr)
    try:
        import numpy as np
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as error:
        fail(f"NIXL's Python API (nixl) or numpy is not installed: {error}")

    deadline = time.monotonic() + args.timeout
    config = nixl_agent_config(backends=["Mooncake"])
    initiator, target = nixl_agent("initiator", config), nixl_agent("target", config)
    if "Mooncake" not in initiator.backends:
        fail("NIXL did not load its Mooncake backend (libplugin_Mooncake.so in NIXL_PLUGIN_DIR?)")
    size = args.blocks * args.block_size
    local, remote = np.zeros(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
    local_reg = initiator.register_memory([(local.ctypes.data, size, 0, "")], "DRAM")
    remote_reg = target.register_memory([(remote.ctypes.data, size, 0, "")], "DRAM")
    if local_reg is None or remote_reg is None:
        fail("memory registration failed")
    if initiator.add_remote_agent(target.get_agent_metadata()) not in ("target", b"target"):
        fail("the target's metadata was not accepted")
    target.add_remote_agent(initiator.get_agent_metadata())

    def blocks(array):
        base = array.ctypes.data
        return [(base + i * args.block_size, args.block_size, 0) for i in range(args.blocks)]

    local_descs = initiator.get_xfer_descs(blocks(local), "DRAM")
    remote_descs = initiator.get_xfer_descs(blocks(remote), "DRAM")
    rng = np.random.default_rng(7)
    moved, started = 0, time.monotonic()
    for round_number in range(args.rounds):
        local[:] = rng.integers(0, 256, size, dtype=np.uint8)
        remote[:] = 0
        note = f"write {round_number}".encode()
        handle = initiator.initialize_xfer("WRITE", local_descs, remote_descs, "target", note)
        if initiator.transfer(handle) == "ERR":
            fail("WRITE could not be posted")
        wait_done(initiator, handle, deadline)
        initiator.release_xfer_handle(handle)
        wait_notification(target, "initiator", note, deadline)
        if not np.array_equal(local, remote):
            fail(f"round {round_number}: WRITE landed wrong bytes")

        remote[:] = rng.integers(0, 256, size, dtype=np.uint8)
        local[:] = 0
        # A notification that is not UTF-8 (NIXL users send bytes): delivered with U+FFFD in place.
        note = b"\xfe" + f"read {round_number}".encode()
        handle = initiator.initialize_xfer("READ", local_descs, remote_descs, "target", note)
        if initiator.transfer(handle) == "ERR":
            fail("READ could not be posted")
        wait_done(initiator, handle, deadline)
        initiator.release_xfer_handle(handle)
        wait_notification(target, "initiator", "\ufffd".encode() + note[1:], deadline)
        if not np.array_equal(local, remote):
            fail(f"round {round_number}: READ brought wrong bytes")
        moved += 2 * size
    elapsed = time.monotonic() - started
    initiator.remove_remote_agent("target")
    target.remove_remote_agent("initiator")
    initiator.deregister_memory(local_reg)
    target.deregister_memory(remote_reg)
    print(f"nixl_agent_check: {args.rounds} WRITE+READ rounds of {args.blocks} x {args.block_size} B through "
          f"NIXL's Mooncake backend: every byte and notification arrived "
          f"({moved / elapsed / 1e9:.2f} GB/s including checks)")


if __name__ == "__main__":
    main()
