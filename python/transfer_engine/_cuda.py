"""Transfers ordered on a CUDA stream (cudaLaunchHostFunc), as upstream's ``*_on_cuda`` methods."""
import ctypes
import os

from ._native import _vp, last_error
from ._types import TransferOpcode

_HOST_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_cuda_callbacks = {}
_cuda_library = []


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
            runtime.cudaLaunchHostFunc.argtypes = [ctypes.c_void_p, _HOST_FUNCTION, ctypes.c_void_p]
            runtime.cudaGetErrorString.restype = ctypes.c_char_p
            runtime.cudaGetErrorString.argtypes = [ctypes.c_int]
        _cuda_library.append(runtime)
    return _cuda_library[0]


class CudaStreamTransfers:
    """The ``*_on_cuda`` methods of ``TransferEngine`` (a mixin: they use its ``_segment`` and
    ``batch_transfer_sync``)."""

    def transfer_write_on_cuda(self, target_hostname, buffer, peer_buffer_address, length, stream_ptr=0, transport_hint=""):
        """transfer_sync_write once the work queued on the CUDA stream before it finished (see
        batch_transfer_write_on_cuda)."""
        self._on_cuda(target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.Write, stream_ptr, transport_hint)

    def transfer_read_on_cuda(self, target_hostname, buffer, peer_buffer_address, length, stream_ptr=0, transport_hint=""):
        """transfer_sync_read once the work queued on the CUDA stream before it finished."""
        self._on_cuda(target_hostname, [buffer], [peer_buffer_address], [length], TransferOpcode.Read, stream_ptr, transport_hint)

    def batch_transfer_write_on_cuda(self, target_hostname, buffers, peer_buffer_addresses, lengths, stream_ptr=0, transport_hint=""):
        """Queues a host function on the CUDA stream (cudaLaunchHostFunc) that writes the batch
        when every kernel and copy queued before it has finished; returns at once. A failure is
        kept in cuda_transfer_failures() (upstream ends the process). The host function runs
        Python (it takes the GIL): do not wait on that stream while holding the GIL. Raises
        RuntimeError where no CUDA runtime (libcudart, or MC_CUDART_LIBRARY) can be loaded."""
        self._on_cuda(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Write, stream_ptr, transport_hint)

    def batch_transfer_read_on_cuda(self, target_hostname, buffers, peer_buffer_addresses, lengths, stream_ptr=0, transport_hint=""):
        """As batch_transfer_write_on_cuda, reading."""
        self._on_cuda(target_hostname, buffers, peer_buffer_addresses, lengths, TransferOpcode.Read, stream_ptr, transport_hint)

    def cuda_transfer_failures(self):
        """Why transfers queued on CUDA streams failed, oldest first (at most 100 kept)."""
        return list(getattr(self, "_cuda_failures", []))

    def _on_cuda(self, target_hostname, buffers, peer_buffer_addresses, lengths, opcode, stream_ptr, transport_hint):
        runtime = _cuda_runtime()
        if runtime is None:
            raise RuntimeError("transfers on a CUDA stream need the CUDA runtime (libcudart.so; MC_CUDART_LIBRARY names another), "
                               "which cannot be loaded here; synchronize the stream and use the transfer_sync_* methods instead")
        if not self._handle:
            raise RuntimeError("the engine is not initialized")
        if not (len(buffers) == len(peer_buffer_addresses) == len(lengths)):
            raise ValueError("buffers, peer_buffer_addresses and lengths have different sizes")
        if self._segment(target_hostname) < 0:
            raise RuntimeError(f"cannot open segment {target_hostname}: {last_error()}")
        buffers, peers, sizes = list(buffers), list(peer_buffer_addresses), list(lengths)
        # Callbacks the driver has run are dropped here, never from inside themselves.
        for done in [k for k, (_, finished) in _cuda_callbacks.items() if finished[0]]:
            del _cuda_callbacks[done]
        finished = [False]

        def run(_user_data):
            # On the CUDA driver's thread, once the stream got here. It runs Python, so it takes the
            # GIL: a thread that waits on this stream while holding the GIL would wait forever.
            try:
                if self.batch_transfer_sync(target_hostname, buffers, peers, sizes, opcode, transport_hint=transport_hint) != 0:
                    self._cuda_failed(f"{opcode.name} of {sum(sizes)} bytes to {target_hostname}: {last_error()}")
            except Exception as error:  # noqa: BLE001 - nothing above this frame would see it
                self._cuda_failed(f"{opcode.name} of {sum(sizes)} bytes to {target_hostname}: {error!r}")
            finally:
                finished[0] = True

        callback = _HOST_FUNCTION(run)
        key = id(callback)
        _cuda_callbacks[key] = (callback, finished)  # alive until the driver has called it
        status = runtime.cudaLaunchHostFunc(_vp(stream_ptr), callback, None)
        if status != 0:
            del _cuda_callbacks[key]
            raise RuntimeError("cudaLaunchHostFunc failed: " + (runtime.cudaGetErrorString(status) or b"error %d" % status).decode())

    def _cuda_failed(self, text):
        failures = self.__dict__.setdefault("_cuda_failures", [])
        failures.append(text)
        del failures[:-100]
