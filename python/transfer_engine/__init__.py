"""Drop-in replacement for ``mooncake.engine.TransferEngine`` backed by the Swift
transfer engine's C API (``libtransfer_engine_c.so``).

Migrating is one line::

    # from mooncake.engine import TransferEngine
    from transfer_engine import TransferEngine

Method names, signatures, defaults and return codes follow the official
binding: 0 for success and a negative number for failure, batch ids with 0 as
the failure value. Blocking calls release the GIL (ctypes drops it for the
duration of every foreign call).
"""
import ctypes
import json
import operator
import os

from ._native import (_NotifyMsg, _TransferStatus, _active_protocols, _allocate_batch, _allocate_managed, _create,
                      _destroy, _first_buffer, _free_batch, _free_managed, _free_notifs, _gen_notify, _get_metrics, _get_notifs,
                      _install_transport, _local_name, _open, _probe, _register, _show_links, _status, _submit, _submit_hint,
                      _submit_notify, _transfer_sync, _uninstall_transport, _unregister, _wait_batch, _warmup)
from ._native import _INVALID_BATCH, _hint, _request_array, library_path, last_error
from ._types import (SUPPORT_CUDA, SUPPORT_EFA, SUPPORT_HIP, SUPPORT_INTRA_NVLINK, SUPPORT_MNNVL, SUPPORT_MUSA, InnerTransferEngine, Read,
                     TransferNotify, TransferOpcode, Write, _addresses_ok, _timeout_seconds)
from ._cuda import CudaStreamTransfers

__all__ = ["TransferEngine", "TransferOpcode", "TransferNotify", "InnerTransferEngine", "Read", "Write", "SUPPORT_EFA", "SUPPORT_HIP", "SUPPORT_MNNVL",
           "SUPPORT_MUSA", "SUPPORT_INTRA_NVLINK", "SUPPORT_CUDA", "library_path"]


def _truthy(value):
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class TransferEngine(CudaStreamTransfers):
    """The engine; every method of ``mooncake.engine.TransferEngine``."""

    def __init__(self):
        self._handle = None
        self._segments = {}

    def __del__(self):
        # The engine stops its listeners, lanes and plugin threads, then frees the managed
        # memory it allocated (no peer or in-flight transfer can touch it any more).
        try:
            if self._handle:
                handle, self._handle = self._handle, None
                _destroy(handle)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- setup ---------------------------------------------------------------
    def initialize(self, local_hostname, metadata_server, protocol, device_name):
        """Starts the engine; 0 on success, -1 on failure (the reason is logged)."""
        return self.initialize_ext(local_hostname, metadata_server, protocol, device_name, "")

    def initialize_ext(self, local_hostname, metadata_server, protocol, device_name, metadata_type):
        """As initialize, with metadata_type ("etcd", "redis", "http") for a server given without a scheme."""
        if self._handle:
            return -1
        if metadata_server != "P2PHANDSHAKE" and "://" not in metadata_server and metadata_type:
            metadata_server = f"{metadata_type}://{metadata_server}"
        handle = _create(metadata_server.encode(), local_hostname.encode(), (protocol or "").encode(), (device_name or "").encode())
        if not handle:
            import sys
            print(f"transfer_engine: initialize failed: {last_error()}", file=sys.stderr)
            return -1
        self._handle = handle
        return 0

    def install_transport(self, protocol):
        """Adds a transport ("shm", "efa", ...) at run time; 0, or -1 when its plugin or hardware is missing."""
        if not self._handle or not _install_transport(self._handle, protocol.encode(), None):
            return -1
        return 0

    def uninstall_transport(self, protocol):
        """Removes an installed transport (not tcp); requests route over the others. 0 or -1."""
        if not self._handle:
            return -1
        return 0 if _uninstall_transport(self._handle, protocol.encode()) == 0 else -1

    def get_active_protocols(self):
        """Installed transports in routing order, tcp last (e.g. ["shm", "efa", "tcp"])."""
        buffer = ctypes.create_string_buffer(1024)
        if not self._handle or _active_protocols(self._handle, buffer, 1024) != 0:
            return []
        return buffer.value.decode().split(",")

    def get_rpc_port(self):
        """The handshake (RPC) port: the port of this engine's segment name."""
        return int(self._local_name().rsplit(":", 1)[1])

    def _local_name(self):
        buffer = ctypes.create_string_buffer(256)
        if not self._handle or _local_name(self._handle, buffer, 256) != 0:
            raise RuntimeError("engine not initialized")
        return buffer.value.decode()

    def get_engine(self):
        """The engine behind this object, as upstream's ``InnerTransferEngine``."""
        return InnerTransferEngine(self)

    def get_engine_ptr(self):
        """The C API handle as an integer."""
        return self._handle or 0

    def get_local_topology(self, device_name=None):
        """Topology JSON in upstream's shape, location -> [preferred NICs, other NICs], as the
        installed transports (rdma, efa) publish it; with none that has NICs (tcp, shm) every
        location maps to empty lists."""
        buffer = ctypes.create_string_buffer(1 << 20)
        if self._handle and _show_links(self._handle, buffer, 1 << 20, 1) == 0:
            try:
                topology = json.loads(buffer.value.decode()).get("topology") or {}
            except ValueError:
                topology = {}
            if topology:
                return json.dumps(topology)
        return json.dumps({"cpu:0": [[], []]})

    def get_metrics(self, format="json"):
        """This process's engine metrics: a dict (format "json": enabled, totals per metric,
        series with labels) or the Prometheus text (format "prometheus"). Recording is on when
        MC_TE_METRIC, MC_METRICS or MC_METRICS_PORT was set before the engine was created."""
        if format not in ("json", "prometheus"):
            raise ValueError("format is 'json' or 'prometheus', not %r" % (format,))
        if not self._handle:
            raise RuntimeError("the engine is not initialized")
        size = 1 << 16
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = _get_metrics(self._handle, buffer, size, 1 if format == "prometheus" else 0)
            if length < 0:
                raise RuntimeError("getMetrics failed: " + last_error())
            if length < size:
                text = buffer.value.decode()
                return text if format == "prometheus" else json.loads(text)
            size = length + 1

    # -- memory --------------------------------------------------------------
    def register_memory(self, buffer_addr, capacity, location="*"):
        """Registers [buffer_addr, +capacity) so peers may read and write it; 0 on success, a negative code on failure."""
        if not self._handle or not _addresses_ok(buffer_addr, capacity):
            return -1
        return _register(self._handle, buffer_addr, capacity, location.encode(), 1)

    def unregister_memory(self, buffer_addr):
        """Unregisters the buffer that starts at buffer_addr; 0 on success, a negative code on failure."""
        if not self._handle:
            return -1
        return _unregister(self._handle, buffer_addr)

    def batch_register_memory(self, buffer_addresses, capacities, location="*"):
        """Registers each (address, capacity) pair; 0 when all succeeded, else the first failure's code."""
        if len(buffer_addresses) != len(capacities):
            return -1
        for address, capacity in zip(buffer_addresses, capacities):
            rc = self.register_memory(address, capacity, location)
            if rc != 0:
                return rc
        return 0

    def batch_unregister_memory(self, buffer_addresses):
        """Unregisters each address; 0 when all succeeded, else the first failure's code."""
        result = 0
        for address in buffer_addresses:
            rc = self.unregister_memory(address)
            if rc != 0 and result == 0:
                result = rc
        return result

    def allocate_managed_buffer(self, length, location="cpu:0"):
        """Allocates and registers memory through the engine: from a transport that provides its
        own (a CXL pool, GPU memory for "cuda:N"), else page-aligned heap memory; its address,
        or 0 on failure."""
        try:
            length = operator.index(length)
        except TypeError:
            return 0
        if not self._handle or length <= 0:
            return 0
        address = _allocate_managed(self._handle, length, (location or "").encode())
        return address or 0

    def free_managed_buffer(self, buffer_addr, length):
        """Unregisters and frees a buffer from allocate_managed_buffer; 0, or -1 when it is not one."""
        if not self._handle or not buffer_addr:
            return -1
        return 0 if _free_managed(self._handle, buffer_addr) == 0 else -1

    def write_bytes_to_buffer(self, dest_address, src_ptr, length):
        """Copies length bytes of src_ptr (bytes) to local memory at dest_address; 0."""
        ctypes.memmove(dest_address, src_ptr, length)
        return 0

    def read_bytes_from_buffer(self, source_address, length):
        """The length bytes of local memory at source_address, as bytes."""
        return ctypes.string_at(source_address, length)

    # -- segments ------------------------------------------------------------
    def _segment(self, target_hostname):
        if not self._handle:
            return -1
        segment = self._segments.get(target_hostname)
        if segment is None or _truthy(os.environ.get("MC_DISABLE_METACACHE")):  # the engine fetches it again
            segment = _open(self._handle, target_hostname.encode())
            if segment < 0:
                return -1
            self._segments[target_hostname] = segment
        return segment

    def get_first_buffer_address(self, segment_name):
        """The address of the first buffer the named segment registered (opening it first); 0 on failure."""
        segment = self._segment(segment_name)
        return 0 if segment < 0 else _first_buffer(self._handle, segment)

    def send_probe(self, peer_server_name):
        """Checks that the named peer's engine answers on its handshake port; 0 if it does, -1 otherwise."""
        if not self._handle:
            return -1
        return 0 if _probe(self._handle, peer_server_name.encode()) == 0 else -1

    # -- transfers -----------------------------------------------------------
    def transfer_sync_write(self, target_hostname, buffer, peer_buffer_address, length, transport_hint=""):
        """Writes length bytes from local buffer to the peer's address and waits; 0 on success, -1 on failure."""
        return self.transfer_sync(target_hostname, buffer, peer_buffer_address, length, TransferOpcode.Write, transport_hint=transport_hint)

    def transfer_sync_read(self, target_hostname, buffer, peer_buffer_address, length, transport_hint=""):
        """Reads length bytes from the peer's address into local buffer and waits; 0 on success, -1 on failure."""
        return self.transfer_sync(target_hostname, buffer, peer_buffer_address, length, TransferOpcode.Read, transport_hint=transport_hint)

    def transfer_sync(self, target_hostname, buffer, peer_buffer_address, length, opcode, notify=None, transport_hint=""):
        """One transfer in the direction of opcode (TransferOpcode), then notify if given; 0 on success, -1 on failure."""
        if not _addresses_ok(buffer, peer_buffer_address, length):
            return -1
        segment = self._segment(target_hostname)
        if segment < 0:
            return -1
        if _transfer_sync(self._handle, segment, int(opcode), buffer, peer_buffer_address, length, _hint(transport_hint)) != 0:
            return -1
        return self._notify(segment, notify)

    def _notify(self, segment, notify):
        """Sends the notification after a completed synchronous transfer (before returning, as callers expect)."""
        if notify is None:
            return 0
        message = _NotifyMsg(notify.name.encode(), notify.msg.encode())
        return 0 if _gen_notify(self._handle, segment, message) == 0 else -1

    def _submit(self, segment, buffers, peer_addresses, lengths, opcode, notify=None, transport_hint=""):
        count = len(buffers)
        if count == 0 or count != len(peer_addresses) or count != len(lengths):
            return 0
        if not _addresses_ok(*buffers, *peer_addresses, *lengths):
            return 0
        batch = _allocate_batch(self._handle, count)
        if batch == _INVALID_BATCH:
            return 0
        requests = _request_array(opcode, buffers, segment, peer_addresses, lengths)
        if notify is None:
            rc = _submit_hint(self._handle, batch, requests, count, _hint(transport_hint))
        else:
            rc = _submit_notify(self._handle, batch, requests, count, _NotifyMsg(notify.name.encode(), notify.msg.encode()))
        if rc != 0:
            _free_batch(self._handle, batch)
            return 0
        return batch

    def _finish(self, batch, timeout):
        """Waits, frees the batch, returns 1 completed / -1 failed / -2 timeout."""
        rc = _wait_batch(self._handle, batch, int(timeout * 1000))
        if rc == 0:
            return -2
        _free_batch(self._handle, batch)
        return 1 if rc == 1 else -1

    def batch_transfer_sync_write(self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""):
        """Writes every (buffer, peer address, length) triple in one batch and waits; 0 on success, -1 on failure."""
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Write,
                                        transport_hint=transport_hint)

    def batch_transfer_sync_read(self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""):
        """Reads every (buffer, peer address, length) triple in one batch and waits; 0 on success, -1 on failure."""
        return self.batch_transfer_sync(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Read,
                                        transport_hint=transport_hint)

    def batch_transfer_sync(self, target_hostname, buffers, peer_buffer_addresses, lengths, opcode, notify=None, transport_hint=""):
        """One batch in the direction of opcode, waited for, then notify if given; 0 on success, -1 on failure."""
        segment = self._segment(target_hostname)
        if segment < 0:
            return -1
        batch = self._submit(segment, buffers, peer_buffer_addresses, lengths, opcode, transport_hint=transport_hint)
        if not batch or self._finish(batch, _timeout_seconds(sum(lengths))) != 1:
            return -1
        return self._notify(segment, notify)

    def batch_transfer_async_write(self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""):
        """Submits the writes as one batch and returns its id at once (0 on failure)."""
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Write,
                                         transport_hint=transport_hint)

    def batch_transfer_async_read(self, target_hostname, buffers, peer_buffer_addresses, lengths, transport_hint=""):
        """Submits the reads as one batch and returns its id at once (0 on failure)."""
        return self.batch_transfer_async(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Read,
                                         transport_hint=transport_hint)

    def batch_transfer_async(self, target_hostname, buffers, peer_buffer_addresses, lengths, opcode, transport_hint=""):
        """Submits and returns the batch id at once (0 on failure)."""
        segment = self._segment(target_hostname)
        if segment < 0:
            return 0
        batch = self._submit(segment, buffers, peer_buffer_addresses, lengths, opcode, transport_hint=transport_hint)
        if batch:
            self._pending = getattr(self, "_pending", {})
            self._pending[batch] = sum(lengths)
        return batch

    def get_batch_transfer_status(self, batch_ids):
        """Waits for the batches; 0 if all completed, -1 if any failed or timed out. Frees them."""
        result = 0
        pending = getattr(self, "_pending", {})
        for batch in batch_ids:
            if self._finish(batch, _timeout_seconds(pending.pop(batch, 0))) != 1:
                result = -1
        return result

    def transfer_submit_write(self, target_hostname, buffer, peer_buffer_address, length, transport_hint=""):
        """Submits one write; its batch id (0 on failure), to poll with transfer_check_status."""
        return self.batch_transfer_async(target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.Write,
                                         transport_hint=transport_hint)

    def transfer_check_status(self, batch_id):
        """1 completed (batch freed), 0 pending, -1 failed (freed), -2 timeout."""
        status = _TransferStatus()
        if _status(self._handle, batch_id, 0, ctypes.byref(status)) != 0:
            return -1
        if status.status == 4:
            _free_batch(self._handle, batch_id)
            return 1
        if status.status in (1, 0):
            return 0
        _free_batch(self._handle, batch_id)
        return -2 if status.status == 5 else -1

    # -- notifications -------------------------------------------------------
    def get_notifies(self):
        """Notifications received since the last call, as TransferNotify objects."""
        if not self._handle:
            return []
        count = ctypes.c_int(0)
        messages = _get_notifs(self._handle, ctypes.byref(count))
        if not messages:
            return []
        try:
            return [TransferNotify(messages[i].name.decode(), messages[i].msg.decode()) for i in range(count.value)]
        finally:
            _free_notifs(messages, count.value)

    def warmup_efa_segment(self, segment_name):
        """Opens the segment and connects every installed transport but tcp that the peer
        offers (efa, rdma, ...), so the first transfer pays no connection setup; 0 or -1."""
        if not self._handle or not isinstance(segment_name, str):
            return -1
        if _warmup(self._handle, segment_name.encode()) != 0:
            return -1
        return 0 if self._segment(segment_name) >= 0 else -1


# Upstream binds the enum on the class too: TransferEngine.TransferOpcode.Write
TransferEngine.TransferOpcode = TransferOpcode
