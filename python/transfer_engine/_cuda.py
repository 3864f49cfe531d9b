"""Transfers ordered on a CUDA stream (cudaLaunchHostFunc), as upstream's ``*_on_cuda`` methods."""
import ctypes
import os

from ._native import (_hint, _request_array, _stream_failures, _stream_job_create, _stream_job_discard, _stream_jobs_pending, _vp,
                      last_error, stream_job_run)
from ._types import TransferOpcode, _addresses_ok

_cuda_library = []
# Engines with jobs still queued on a stream: kept alive (a collected engine is destroyed, and a
# job of a destroyed engine moves nothing); dropped at a later *_on_cuda call once their jobs ran.
_engines_with_jobs = set()


def _forget_idle_engines():
    for engine in [e for e in _engines_with_jobs if not e._handle or _stream_jobs_pending(e._handle) <= 0]:
        _engines_with_jobs.discard(engine)


def _cuda_runtime():
    """The CUDA runtime library, loaded once; None where there is none."""
    if not _cuda_library:
        names = [os.environ.get("MC_CUDART_LIBRARY"), "libcudart.so", "libcudart.so.12", "libcudart.so.11.0"]
        runtime = None
        for name in filter(None, names):
            try:
                runtime = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if runtime is not None:
            runtime.cudaLaunchHostFunc.restype = ctypes.c_int
            runtime.cudaLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            runtime.cudaGetErrorString.restype = ctypes.c_char_p
            runtime.cudaGetErrorString.argtypes = [ctypes.c_int]
        _cuda_library.append(runtime)
    return _cuda_library[0]


class CudaStreamTransfers:
    """The ``*_on_cuda`` methods of ``TransferEngine`` (a mixin: they use its ``_handle`` and
    ``_segment``)."""

    def transfer_write_on_cuda(self, target_hostname, buffer, peer_buffer_address, length, stream_ptr=0, transport_hint=""):
        """transfer_sync_write once the work queued on the CUDA stream before it finished (see
        batch_transfer_write_on_cuda)."""
        self._on_cuda(target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.Write, stream_ptr, transport_hint)

    def transfer_read_on_cuda(self, target_hostname, buffer, peer_buffer_address, length, stream_ptr=0, transport_hint=""):
        """transfer_sync_read once the work queued on the CUDA stream before it finished."""
        self._on_cuda(target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.Read, stream_ptr, transport_hint)

    def batch_transfer_write_on_cuda(self, target_hostname, buffers, peer_buffer_addresses, lengths, stream_ptr=0, transport_hint=""):
        """Queues the batch on the CUDA stream (cudaLaunchHostFunc): it is written when every
        kernel and copy queued before it has finished; returns at once. The host function is the
        engine's C code (te_stream_job_run), so it takes no GIL and a thread waiting on the stream
        cannot block it. A failure is kept in cuda_transfer_failures() (upstream ends the process).
        Raises RuntimeError where no CUDA runtime (libcudart, or MC_CUDART_LIBRARY) can be loaded."""
        self._on_cuda(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Write, stream_ptr, transport_hint)

    def batch_transfer_read_on_cuda(self, target_hostname, buffers, peer_buffer_addresses, lengths, stream_ptr=0, transport_hint=""):
        """As batch_transfer_write_on_cuda, reading."""
        self._on_cuda(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Read, stream_ptr, transport_hint)

    def cuda_transfer_failures(self):
        """Why transfers queued on CUDA streams failed, oldest first (at most 100 kept)."""
        _forget_idle_engines()
        if not self._handle:
            return []
        size = 65536
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = _stream_failures(self._handle, buffer, size)
            if length >= 0:
                text = buffer.raw[:length].decode(errors="replace")
                return text.split("\n") if text else []
            if length == -1 or -length <= size:
                raise RuntimeError("cannot read the stream failures: " + last_error())
            size = -length

    def _on_cuda(self, target_hostname, buffers, peer_buffer_addresses, lengths, opcode, stream_ptr, transport_hint):
        runtime = _cuda_runtime()
        if runtime is None:
            raise RuntimeError("transfers on a CUDA stream need the CUDA runtime (libcudart.so; MC_CUDART_LIBRARY names another), "
                               "which cannot be loaded here; synchronize the stream and use the transfer_sync_* methods instead")
        if not self._handle:
            raise RuntimeError("the engine is not initialized")
        count = len(buffers)
        if count == 0 or not (count == len(peer_buffer_addresses) == len(lengths)):
            raise ValueError("buffers, peer_buffer_addresses and lengths must be non-empty and of one size")
        if not _addresses_ok(*buffers, *peer_buffer_addresses, *lengths):
            raise ValueError("addresses and lengths must be non-negative integers")
        segment = self._segment(target_hostname)
        if segment < 0:
            raise RuntimeError(f"cannot open segment {target_hostname}: {last_error()}")
        requests = _request_array(opcode, buffers, segment, peer_buffer_addresses, lengths)
        job = _stream_job_create(self._handle, requests, count, _hint(transport_hint))
        if not job:
            raise ValueError(f"cannot queue the transfer: {last_error()}")
        _forget_idle_engines()
        _engines_with_jobs.add(self)
        status = runtime.cudaLaunchHostFunc(_vp(stream_ptr), stream_job_run, _vp(job))
        if status != 0:
            _stream_job_discard(job)
            raise RuntimeError("cudaLaunchHostFunc failed: " + (runtime.cudaGetErrorString(status) or b"error %d" % status).decode())
