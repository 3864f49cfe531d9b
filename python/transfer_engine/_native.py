"""The C API library (libtransfer_engine_c.so) and its functions, bound with ctypes."""
import ctypes
import os

# The Swift runtime must not take over this process's crash handling.
os.environ.setdefault("SWIFT_BACKTRACE", "enable=no")

_INVALID_BATCH = 2**64 - 1


def _find_library():
    candidates = []
    if os.environ.get("TRANSFER_ENGINE_LIBRARY"):
        candidates.append(os.environ["TRANSFER_ENGINE_LIBRARY"])
    here = os.path.dirname(os.path.abspath(__file__))
    candidates.append(os.path.join(here, "_lib", "libtransfer_engine_c.so"))
    repo = os.path.dirname(os.path.dirname(here))
    for config in ("release", "debug"):
        candidates.append(os.path.join(repo, ".build", config, "libtransfer_engine_c.so"))
    # The Debian package's library (SONAME libtransfer_engine_c.so.0; the unversioned link is in -dev).
    candidates.append("/usr/lib/transfer-engine/libtransfer_engine_c.so.0")
    for path in candidates:
        if os.path.exists(path):
            return path
    raise ImportError("libtransfer_engine_c.so not found; set TRANSFER_ENGINE_LIBRARY or build it with "
                      "`swift build -c release` in the repository (searched: " + ", ".join(candidates) + ")")


library_path = _find_library()
_lib = ctypes.CDLL(library_path)


class _TransferRequest(ctypes.Structure):
    _fields_ = [("opcode", ctypes.c_int), ("source", ctypes.c_void_p), ("target_id", ctypes.c_int32),
                ("target_offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _TransferStatus(ctypes.Structure):
    _fields_ = [("status", ctypes.c_int), ("transferred_bytes", ctypes.c_uint64)]


class _NotifyMsg(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("msg", ctypes.c_char_p)]


def _signature(name, restype, *argtypes):
    function = getattr(_lib, name)
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_vp, _cp, _u64, _i32, _int, _sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int, ctypes.c_size_t
_create = _signature("createTransferEngineExt", _vp, _cp, _cp, _cp, _cp)
_destroy = _signature("destroyTransferEngine", None, _vp)
_local_name = _signature("getLocalIpAndPort", _int, _vp, ctypes.c_char_p, _sz)
_open = _signature("openSegment", _i32, _vp, _cp)
_register = _signature("registerLocalMemory", _int, _vp, _vp, _sz, _cp, _int)
_unregister = _signature("unregisterLocalMemory", _int, _vp, _vp)
_allocate_batch = _signature("allocateBatchID", _u64, _vp, _sz)
_submit = _signature("submitTransfer", _int, _vp, _u64, ctypes.POINTER(_TransferRequest), _sz)
_submit_notify = _signature("submitTransferWithNotify", _int, _vp, _u64, ctypes.POINTER(_TransferRequest), _sz, _NotifyMsg)
_status = _signature("getTransferStatus", _int, _vp, _u64, _sz, ctypes.POINTER(_TransferStatus))
_free_batch = _signature("freeBatchID", _int, _vp, _u64)
_get_notifs = _signature("getNotifsFromEngine", ctypes.POINTER(_NotifyMsg), _vp, ctypes.POINTER(_int))
_free_notifs = _signature("freeNotifsMsgBuf", _int, ctypes.POINTER(_NotifyMsg), _int)
_transfer_sync = _signature("te_transfer_sync_hint", _int, _vp, _i32, _int, _vp, _u64, _u64, _cp)
_submit_hint = _signature("te_submit_transfer_hint", _int, _vp, _u64, ctypes.POINTER(_TransferRequest), _sz, _cp)
_active_protocols = _signature("te_active_protocols", _int, _vp, ctypes.c_char_p, _sz)
_install_transport = _signature("installTransport", _vp, _vp, _cp, _vp)
_uninstall_transport = _signature("uninstallTransport", _int, _vp, _cp)
_wait_batch = _signature("te_wait_batch", _int, _vp, _u64, _u64)
_first_buffer = _signature("te_first_buffer_address", _u64, _vp, _i32)
_probe = _signature("te_send_probe", _int, _vp, _cp)
_available = _signature("te_protocol_available", _int, _cp)
_active_protocol = _signature("te_active_protocol", _int, _vp, ctypes.c_char_p, _sz)
_last_error = _signature("te_last_error", _cp)
_gen_notify = _signature("genNotifyInEngine", _int, _vp, _u64, _NotifyMsg)
_show_links = _signature("showLinks", _int, _vp, ctypes.c_char_p, _sz, _int)
_get_metrics = _signature("getMetrics", _int, _vp, ctypes.c_char_p, _sz, _int)
_warmup = _signature("warmupEfaSegment", _int, _vp, _cp)
_allocate_managed = _signature("te_allocate_managed_buffer", _vp, _vp, _sz, _cp)
_free_managed = _signature("te_free_managed_buffer", _int, _vp, _vp)
_stream_job_create = _signature("te_stream_job_create", _vp, _vp, ctypes.POINTER(_TransferRequest), _sz, _cp)
_stream_job_discard = _signature("te_stream_job_discard", None, _vp)
_stream_failures = _signature("te_stream_failures", _int, _vp, ctypes.c_char_p, _sz)
_stream_jobs_pending = _signature("te_stream_jobs_pending", _int, _vp)
# The host function a GPU stream calls: C code in the library, so it needs no GIL.
stream_job_run = ctypes.cast(_lib.te_stream_job_run, ctypes.c_void_p)



def _request_array(opcode, buffers, segment, peer_addresses, lengths):
    """A C array of transfer_request, one per (buffer, peer address, length), all to `segment`."""
    requests = (_TransferRequest * len(buffers))()
    for i in range(len(buffers)):
        requests[i] = _TransferRequest(int(opcode), buffers[i], segment, peer_addresses[i], lengths[i])
    return requests


def _hint(transport_hint):
    """A transport_hint for the C API: None routes as usual."""
    return transport_hint.encode() if transport_hint else None


def last_error():
    """The C API's last error text on this thread."""
    return (_last_error() or b"").decode(errors="replace")
