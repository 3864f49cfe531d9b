"""The Python package against a second Python process, over TCP and P2PHANDSHAKE."""
import ctypes
import json
import os
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import transfer_engine  # noqa: E402
from transfer_engine import TransferEngine, TransferNotify, TransferOpcode  # noqa: E402

SIZE = 4 << 20


@pytest.fixture(scope="module")
def peer():
    process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "peer.py"), str(SIZE)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    words = process.stdout.readline().split()
    assert words and words[0] == "READY", words

    class Peer:
        segment = words[1]
        address = int(words[2])

        def ask(self, line):
            process.stdin.write(line + "\n")
            process.stdin.flush()
            return process.stdout.readline().strip()

    yield Peer()
    process.stdin.write("quit\n")
    process.stdin.close()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def engine():
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return e


def test_module_surface():
    assert TransferOpcode.Read == 0 and TransferOpcode.Write == 1
    # As upstream's pybind enum: nested on the class, and its values exported at module level.
    assert TransferEngine.TransferOpcode is TransferOpcode
    assert transfer_engine.Read == TransferOpcode.Read and transfer_engine.Write == TransferOpcode.Write
    assert int(TransferEngine.TransferOpcode.Write) == 1
    for name in ["SUPPORT_EFA", "SUPPORT_HIP", "SUPPORT_MNNVL", "SUPPORT_INTRA_NVLINK", "SUPPORT_CUDA", "SUPPORT_MUSA"]:
        assert isinstance(getattr(transfer_engine, name), bool)
    assert transfer_engine.SUPPORT_EFA is False  # no efa plugin is built yet
    for method in ["initialize", "initialize_ext", "get_rpc_port", "allocate_managed_buffer", "free_managed_buffer",
                   "transfer_sync_write", "transfer_sync_read", "transfer_sync", "transfer_submit_write", "transfer_check_status",
                   "batch_transfer_sync_write", "batch_transfer_sync_read", "batch_transfer_sync", "batch_transfer_async",
                   "batch_transfer_async_write", "batch_transfer_async_read", "get_batch_transfer_status", "register_memory",
                   "unregister_memory", "batch_register_memory", "batch_unregister_memory", "write_bytes_to_buffer",
                   "read_bytes_from_buffer", "get_first_buffer_address", "get_local_topology", "get_notifies", "send_probe",
                   "get_engine"]:
        assert callable(getattr(TransferEngine, method)), method


def test_sync_write_and_read(engine, peer):
    local = engine.allocate_managed_buffer(SIZE)
    data = os.urandom(SIZE)
    engine.write_bytes_to_buffer(local, data, SIZE)
    assert engine.transfer_sync_write(peer.segment, local, peer.address, SIZE) == 0
    assert bytes.fromhex(peer.ask(f"read {peer.address} 4096")) == data[:4096]
    back = engine.allocate_managed_buffer(SIZE)
    assert engine.transfer_sync_read(peer.segment, back, peer.address, SIZE) == 0
    assert engine.read_bytes_from_buffer(back, SIZE) == data
    assert engine.get_first_buffer_address(peer.segment) == peer.address
    assert engine.send_probe(peer.segment) == 0
    assert engine.free_managed_buffer(back, SIZE) == 0


def test_batches_async_and_notify(engine, peer):
    block = 64 << 10
    local = engine.allocate_managed_buffer(SIZE)
    engine.write_bytes_to_buffer(local, bytes([7]) * SIZE, SIZE)
    n = SIZE // block
    buffers = [local + i * block for i in range(n)]
    remotes = [peer.address + i * block for i in range(n)]
    assert engine.batch_transfer_sync_write(peer.segment, buffers, remotes, [block] * n) == 0
    batch = engine.batch_transfer_async_read(peer.segment, buffers, remotes, [block] * n)
    assert batch != 0
    assert engine.get_batch_transfer_status([batch]) == 0
    batch = engine.transfer_submit_write(peer.segment, local, peer.address, block)
    deadline = time.time() + 10
    state = 0
    while state == 0 and time.time() < deadline:
        state = engine.transfer_check_status(batch)
    assert state == 1
    assert engine.transfer_sync(peer.segment, local, peer.address, 16, TransferOpcode.Write, TransferNotify("kv", "done")) == 0
    assert json.loads(peer.ask("notifies")) == [["kv", "done"]]


def test_bad_arguments_give_error_codes(engine, peer):
    local = engine.allocate_managed_buffer(4096)
    assert engine.transfer_sync_write(peer.segment, local, peer.address + SIZE - 8, 64) == -1   # past the peer's buffer
    assert engine.transfer_sync_write(peer.segment, local + 8192 * 1024, peer.address, 64) == -1  # unregistered local
    assert engine.transfer_sync_write("127.0.0.1:1", local, peer.address, 64) == -1               # unknown segment
    assert engine.register_memory(local + 16, 16) != 0                                             # overlaps
    assert engine.unregister_memory(12345) != 0
    assert engine.batch_transfer_sync_write(peer.segment, [local], [peer.address], [1, 2]) == -1  # mismatched lists
    assert engine.batch_transfer_async_write("127.0.0.1:1", [local], [peer.address], [8]) == 0
    assert engine.allocate_managed_buffer(-5) == 0
    other = TransferEngine()
    assert other.initialize("127.0.0.1", "ftp://nowhere", "tcp", "") == -1
    assert other.initialize("127.0.0.1", "P2PHANDSHAKE", "warpdrive", "") == -1
    assert other.transfer_sync_write(peer.segment, local, peer.address, 8) == -1  # not initialized
    assert engine.transfer_sync_write(peer.segment, local, peer.address, -8) == -1                # negative length
    assert engine.register_memory(local, -1) == -1
    with pytest.raises(TypeError):
        engine.transfer_sync_write(peer.segment, "not an address", peer.address, 8)
    with pytest.raises(TypeError):
        engine.batch_transfer_sync_write(peer.segment, [local], [None], [8])


def test_remaining_methods(peer):
    e = TransferEngine()
    assert e.initialize_ext("127.0.0.1", "P2PHANDSHAKE", "tcp", "", "p2p") == 0
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == -1  # already initialized
    inner = e.get_engine()
    assert isinstance(inner, transfer_engine.InnerTransferEngine) and inner.handle == e.get_engine_ptr() != 0
    topology = json.loads(e.get_local_topology())
    assert isinstance(topology, dict)
    block = 4096
    a = e.allocate_managed_buffer(block)
    b = e.allocate_managed_buffer(block)
    assert e.free_managed_buffer(a, block) == 0 and e.free_managed_buffer(a, block) == -1
    import ctypes
    raw = [ctypes.create_string_buffer(block) for _ in range(2)]
    addresses = [ctypes.addressof(r) for r in raw]
    assert e.batch_register_memory(addresses, [block, block]) == 0
    raw[0].raw = b"x" * block
    assert e.batch_transfer_sync(peer.segment, [addresses[0]], [peer.address], [block], TransferOpcode.Write,
                                 TransferNotify("batch", "sent")) == 0
    assert json.loads(peer.ask("notifies")) == [["batch", "sent"]]
    assert e.batch_transfer_sync_read(peer.segment, [addresses[1]], [peer.address], [block]) == 0
    assert raw[1].raw == b"x" * block
    batch = e.batch_transfer_async(peer.segment, [addresses[1]], [peer.address + block], [block], TransferOpcode.Read)
    assert batch != 0 and e.get_batch_transfer_status([batch]) == 0
    assert raw[1].raw == bytes.fromhex(peer.ask(f"read {peer.address + block} {block}"))
    assert e.warmup_efa_segment(peer.segment) == 0
    assert e.get_notifies() == []
    assert e.batch_unregister_memory(addresses) == 0
    assert e.batch_unregister_memory(addresses) != 0
    assert e.free_managed_buffer(b, block) == 0


def test_repeated_transfers_to_own_segment():
    """An engine copying within its own segment, as Mooncake Store does; the second transfer once hung."""
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    name = f"127.0.0.1:{e.get_rpc_port()}"
    a = e.allocate_managed_buffer(1 << 20)
    b = e.allocate_managed_buffer(1 << 20)
    for round_ in range(100):
        data = bytes((i + round_) % 251 for i in range(4096))
        assert e.write_bytes_to_buffer(a, data, len(data)) == 0
        assert e.transfer_sync_write(name, a, b + round_, 4096) == 0, round_
        assert e.read_bytes_from_buffer(b + round_, 4096) == data
        assert e.write_bytes_to_buffer(a, bytes(4096), 4096) == 0
        assert e.transfer_sync_read(name, a, b + round_, 4096) == 0, round_
        assert e.read_bytes_from_buffer(a, 4096) == data
    sources = [a + i * 1024 for i in range(8)]
    targets = [b + (1 << 19) + i * 1024 for i in range(8)]
    for round_ in range(20):
        assert e.batch_transfer_sync_write(name, sources, targets, [1000] * 8) == 0, round_
        batch = e.batch_transfer_async_read(name, sources, targets, [1000] * 8)
        assert batch != 0 and e.get_batch_transfer_status([batch]) == 0, round_
    assert e.read_bytes_from_buffer(b + (1 << 19), 1000) == e.read_bytes_from_buffer(a, 1000)
    assert e.send_probe(name) == 0
    e.free_managed_buffer(a, 1 << 20)
    e.free_managed_buffer(b, 1 << 20)


def test_install_uninstall_and_transport_hint(peer):
    """Transports added and removed at run time; a hint the peer cannot honour still routes (over tcp)."""
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    assert e.get_active_protocols() == ["tcp"]
    assert e.install_transport("shm") == 0, transfer_engine.last_error()
    assert e.install_transport("shm") == 0
    assert e.get_active_protocols() == ["shm", "tcp"]
    local = e.allocate_managed_buffer(1 << 20)
    data = os.urandom(1 << 20)
    e.write_bytes_to_buffer(local, data, len(data))
    # The peer runs tcp only: the shm hint falls back to tcp, and so does a hint naming nothing installed.
    assert e.transfer_sync_write(peer.segment, local, peer.address, 1 << 20, transport_hint="shm") == 0
    assert e.batch_transfer_sync_read(peer.segment, [local], [peer.address], [4096], transport_hint="rdma") == 0
    assert e.read_bytes_from_buffer(local, 4096) == data[:4096]
    assert e.uninstall_transport("shm") == 0
    assert e.get_active_protocols() == ["tcp"]
    assert e.uninstall_transport("tcp") == -1
    assert e.install_transport("warpdrive") == -1
    assert e.transfer_sync_read(peer.segment, local, peer.address, 4096) == 0
    e.free_managed_buffer(local, 1 << 20)


def test_managed_buffer_comes_from_the_engine(tmp_path, monkeypatch):
    """allocate_managed_buffer goes through the engine: with cxl on a pool file the memory is the
    pool's (bytes written there are in the file), with tcp page-aligned heap memory."""
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    heap = e.allocate_managed_buffer(8192)
    assert heap != 0 and heap % 4096 == 0
    assert e.free_managed_buffer(heap, 8192) == 0 and e.free_managed_buffer(heap, 8192) == -1
    assert e.allocate_managed_buffer(0) == 0
    pool = tmp_path / "pool"
    with open(pool, "wb") as f:
        f.truncate(64 << 20)
    monkeypatch.setenv("MC_CXL_DEV_PATH", str(pool))
    monkeypatch.setenv("MC_STRICT_PROTOCOL", "1")
    c = TransferEngine()
    if c.initialize("127.0.0.1", "P2PHANDSHAKE", "cxl", "") != 0:
        pytest.skip("the cxl plugin was not built (install libcxl-dev and libdaxctl-dev): " + transfer_engine.last_error())
    address = c.allocate_managed_buffer(1 << 20)
    assert address != 0, transfer_engine.last_error()
    marker = os.urandom(64)
    c.write_bytes_to_buffer(address + 4096, marker, len(marker))
    assert marker in pool.read_bytes(), "the managed buffer is not in the CXL pool"
    assert c.free_managed_buffer(address, 1 << 20) == 0



CUDA_STANDIN = r"""
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
typedef void (*host_fn)(void *);
struct call { host_fn fn; void *data; };
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed = PTHREAD_COND_INITIALIZER;
static int pending;
static void *later(void *raw) {
    struct call c = *(struct call *)raw; free(raw); usleep(20000); c.fn(c.data);
    pthread_mutex_lock(&lock); pending--; pthread_cond_broadcast(&changed); pthread_mutex_unlock(&lock);
    return 0;
}
/* As cudaLaunchHostFunc: the function runs later, on another thread; stream 7 is "invalid". */
int cudaLaunchHostFunc(void *stream, host_fn fn, void *data) {
    if ((long)stream == 7) return 400;
    struct call *c = malloc(sizeof *c); c->fn = fn; c->data = data;
    pthread_mutex_lock(&lock); pending++; pthread_mutex_unlock(&lock);
    pthread_t t; pthread_create(&t, 0, later, c); pthread_detach(t); return 0;
}
/* As cudaStreamSynchronize: waits for every host function launched (at most 10 s: 6 on timeout). */
int cudaStreamSynchronize(void *stream) {
    struct timespec until; clock_gettime(CLOCK_REALTIME, &until); until.tv_sec += 10;
    int rc = 0;
    pthread_mutex_lock(&lock);
    while (pending > 0 && rc == 0) rc = pthread_cond_timedwait(&changed, &lock, &until);
    int left = pending; pthread_mutex_unlock(&lock);
    return left ? 6 : 0;
}
const char *cudaGetErrorString(int e) { return e == 400 ? "invalid resource handle" : "unknown error"; }
"""


def test_transfers_on_a_cuda_stream(peer, tmp_path, monkeypatch):
    """Without a CUDA runtime the *_on_cuda methods raise a clear error; with one (a stand-in
    library exporting cudaLaunchHostFunc, run later on its own thread) the transfer happens when
    the host function runs, and a launch error is raised with the runtime's text."""
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    local = e.allocate_managed_buffer(4096)
    monkeypatch.setenv("MC_CUDART_LIBRARY", str(tmp_path / "missing.so"))
    monkeypatch.setattr(transfer_engine._cuda, "_cuda_library", [])
    if transfer_engine._cuda._cuda_runtime() is None:
        with pytest.raises(RuntimeError, match="CUDA runtime"):
            e.transfer_write_on_cuda(peer.segment, local, peer.address, 4096)
    source = tmp_path / "cudart_standin.c"
    source.write_text(CUDA_STANDIN)
    library = tmp_path / "libcudart_standin.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source), "-lpthread"], check=True)
    monkeypatch.setenv("MC_CUDART_LIBRARY", str(library))
    monkeypatch.setattr(transfer_engine._cuda, "_cuda_library", [])
    data = os.urandom(4096)
    e.write_bytes_to_buffer(local, data, len(data))
    e.batch_transfer_write_on_cuda(peer.segment, [local], [peer.address + 8192], [4096], stream_ptr=1)
    # Wait on the stream holding the GIL (PyDLL keeps it), as a framework's synchronize may: the
    # host function must not need it (a Python callback would wait here until the 10 s bound).
    runtime_holding_gil = ctypes.PyDLL(str(library))
    started = time.time()
    assert runtime_holding_gil.cudaStreamSynchronize(ctypes.c_void_p(1)) == 0, "the host function waited for the GIL"
    assert time.time() - started < 5
    assert bytes.fromhex(peer.ask(f"read {peer.address + 8192} 4096")) == data
    # A transfer the peer refuses (outside its registered memory) is kept, not raised or fatal.
    e.transfer_write_on_cuda(peer.segment, local, peer.address + (1 << 40), 4096, stream_ptr=1)
    assert runtime_holding_gil.cudaStreamSynchronize(ctypes.c_void_p(1)) == 0
    failures = e.cuda_transfer_failures()
    assert len(failures) == 1 and failures[0].startswith("1 requests (0 reads, 1 writes, 4096 bytes)"), failures
    with pytest.raises(RuntimeError, match="invalid resource handle"):
        e.transfer_read_on_cuda(peer.segment, local, peer.address, 4096, stream_ptr=7)
    with pytest.raises(ValueError):
        e.batch_transfer_read_on_cuda(peer.segment, [local], [], [4096], stream_ptr=1)
    with pytest.raises(ValueError):
        e.batch_transfer_read_on_cuda(peer.segment, [local], [-1], [4096], stream_ptr=1)
    assert len(e.cuda_transfer_failures()) == 1


def test_shm_peer_is_refused_once_memory_is_unregistered(monkeypatch):
    """A peer holding the descriptor must not reach a buffer after it was unregistered (shm,
    both the mapped-memfd and the cross-memory path), and nothing it sent lands."""
    plugins = os.path.dirname(os.environ.get("TRANSFER_ENGINE_LIBRARY", ""))
    if not os.path.exists(os.path.join(plugins, "libtransport_shm.so")):
        pytest.skip("libtransport_shm.so is not beside TRANSFER_ENGINE_LIBRARY")
    monkeypatch.setenv("MC_TRANSPORT_PLUGIN_PATH", plugins)
    monkeypatch.setenv("MC_STRICT_PROTOCOL", "1")  # no TCP fallback: the shm plugin must refuse
    process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "peer.py"), str(1 << 20), "shm"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=dict(os.environ))

    def ask(line):
        process.stdin.write(line + "\n")
        process.stdin.flush()
        return process.stdout.readline().strip()

    try:
        words = process.stdout.readline().split()
        assert words and words[0] == "READY", words
        segment, managed = words[1], int(words[2])
        heap = int(ask("heap 65536"))
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "shm", "") == 0
        source = engine.allocate_managed_buffer(65536)
        engine.write_bytes_to_buffer(source, b"\xab" * 65536, 65536)
        original = bytes(i % 251 for i in range(65536)).hex()
        for target in (managed, heap):
            assert engine.transfer_sync_write(segment, source, target, 4096) == 0
            assert ask(f"read {target} 4096") == "ab" * 4096
            assert ask(f"unregister {target}") == "0"
            for offset, length in ((4096, 4096), (8192, 65536 - 8192)):
                assert engine.transfer_sync_write(segment, source, target + offset, length) < 0
            assert ask(f"read {target + 4096} {65536 - 4096}") == original[2 * 4096:], "a write landed after unregister"
        engine.free_managed_buffer(source, 65536)
    finally:
        process.stdin.close()
        process.wait(timeout=30)


def test_get_metrics_counts_the_bytes(peer, monkeypatch):
    """get_metrics(): with MC_METRICS=1 set before the engine is created, a known write shows
    exactly in the JSON series and the Prometheus text; a bad format is a ValueError."""
    monkeypatch.setenv("MC_METRICS", "1")
    e = TransferEngine()
    assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    local = e.allocate_managed_buffer(1 << 20)
    assert e.transfer_sync_write(peer.segment, local, peer.address, 65536) == 0
    metrics = e.get_metrics()
    assert metrics["enabled"] is True
    written = [s["value"] for s in metrics["series"] if s["name"] == "te_transferred_bytes_total"
               and s["labels"].get("peer") == peer.segment and s["labels"].get("operation") == "write"]
    assert written == [65536], written
    assert "# TYPE te_transferred_bytes_total counter" in e.get_metrics("prometheus")
    with pytest.raises(ValueError):
        e.get_metrics("xml")
