/*
 * transfer_engine_c.h - the C API of the Swift Transfer Engine.
 *
 * Mirrors the official Mooncake transfer_engine_c.h: same function names,
 * types, opcodes and return-code families, so C callers (and language
 * bindings such as the Python package) can switch engines by relinking.
 *
 * Every function validates its arguments. Nothing here aborts the calling
 * process: failures return NULL, -1, a negative ERR_* code or a non-zero
 * status code, and te_last_error() gives the reason on the calling thread.
 *
 * Return-code families (as upstream):
 *  - functions returning a status (submitTransfer, submitTransferWithNotify,
 *    getTransferStatus, freeBatchID) return 0 or a POSITIVE status code;
 *  - the other int functions return 0 or a NEGATIVE ERR_* code.
 */
#ifndef TRANSFER_ENGINE_C_H
#define TRANSFER_ENGINE_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define segment_handle_t int32_t
#define segment_id_t int32_t
#define batch_id_t uint64_t
#define LOCAL_SEGMENT (0)
#define INVALID_BATCH UINT64_MAX

#define OPCODE_READ (0)
#define OPCODE_WRITE (1)

/* Transfer states reported in transfer_status.status. */
#define STATUS_WAITING 0
#define STATUS_PENDING 1
#define STATUS_INVALID 2
#define STATUS_CANCELED 3
#define STATUS_COMPLETED 4
#define STATUS_TIMEOUT 5
#define STATUS_FAILED 6

/* Negative codes of the int-returning functions (upstream error.h). */
#define ERR_INVALID_ARGUMENT (-1)
#define ERR_TOO_MANY_REQUESTS (-2)
#define ERR_ADDRESS_NOT_REGISTERED (-3)
#define ERR_BATCH_BUSY (-4)
#define ERR_DEVICE_NOT_FOUND (-6)
#define ERR_ADDRESS_OVERLAPPED (-7)
#define ERR_DNS (-101)
#define ERR_SOCKET (-102)
#define ERR_MALFORMED_JSON (-103)
#define ERR_REJECT_HANDSHAKE (-104)
#define ERR_METADATA (-200)
#define ERR_ENDPOINT (-201)
#define ERR_CONTEXT (-202)
#define ERR_NUMA (-300)
#define ERR_CLOCK (-301)
#define ERR_MEMORY (-302)
#define ERR_NOT_IMPLEMENTED (-303)

/* Positive status codes of the status-returning functions (upstream Status::Code). */
#define STATUS_CODE_OK 0
#define STATUS_CODE_INVALID_ARGUMENT 1
#define STATUS_CODE_TOO_MANY_REQUESTS 2
#define STATUS_CODE_ADDRESS_NOT_REGISTERED 3
#define STATUS_CODE_BATCH_BUSY 4
#define STATUS_CODE_NOT_SUPPORTED_TRANSPORT 8
#define STATUS_CODE_SOCKET 102
#define STATUS_CODE_METADATA 200
#define STATUS_CODE_NOT_IMPLEMENTED 999

typedef void *transfer_engine_t;
typedef void *transport_t;

/** One transfer: target_offset is the absolute address in the target process. */
struct transfer_request {
    int opcode;
    void *source;
    segment_id_t target_id;
    uint64_t target_offset;
    uint64_t length;
};
typedef struct transfer_request transfer_request_t;

/** A task's state and progress. */
struct transfer_status {
    int status;
    uint64_t transferred_bytes;
};
typedef struct transfer_status transfer_status_t;

/** A notification: both strings are NUL-terminated. */
struct notify_msg {
    char *name;
    char *msg;
};
typedef struct notify_msg notify_msg_t;

/** One buffer for the batch registration functions. */
struct buffer_entry {
    void *addr;
    size_t length;
};
typedef struct buffer_entry buffer_entry_t;

/**
 * A segment as upstream describes it (kept for source compatibility; no function here takes one).
 * type: RDMA or NVMe-oF, with the matching member of desc_.
 */
struct segment_desc {
    int type;
    union {
        struct {
            void *addr;
            uint64_t size;
            const char *location;
        } rdma;
        struct {
            const char *file_path;
            const char *subsystem_name;
            const char *proto;
            const char *ip;
            uint64_t port;
        } nvmeof;
    } desc_;
};
typedef struct segment_desc segment_desc_t;

/** One NIC's load, as getNicLoadStats reports it. */
struct nic_load_stat {
    char device_name[64];
    uint64_t inflight_bytes;
    double ewma_bandwidth_bps;
};
typedef struct nic_load_stat nic_load_stat_t;

/**
 * Creates and starts an engine. metadata_conn_string: "P2PHANDSHAKE", "etcd://host:port[,...]",
 * "redis://host:port" or "http://host:port/path" (upstream's forms, a bare "host:port" being
 * etcd). local_server_name: the segment name with a metadata server; in P2P mode its host
 * (and a port, used when free) and the segment name becomes host:rpc_port.
 * ip_or_host_name (NULL or "": local_server_name's host): the address peers reach this engine
 * at; listeners bind to it (unless MC_TCP_BIND_ADDRESS) and the P2P name and published
 * rpc_meta carry it. rpc_port (0: chosen as above): the handshake port; creation fails when it
 * is taken. auto_discover != 0: the chosen transports find their devices themselves
 * (device_name "auto-discovery") unless MOONCAKE_DEVICE or the config file names them. The protocols come from
 * MOONCAKE_PROTOCOL (a comma list; default tcp). Returns NULL on failure (te_last_error says why).
 */
transfer_engine_t createTransferEngine(const char *metadata_conn_string, const char *local_server_name,
                                       const char *ip_or_host_name, uint64_t rpc_port, int auto_discover);

/**
 * Installs the transport proto ("rdma", "shm", ...) next to those the engine runs: its plugin
 * is loaded and probed, every registered buffer is registered with it, and the published
 * descriptor lists it. Installing one already installed (tcp included) does nothing. Returns
 * a non-NULL token, or NULL when the plugin or its hardware is missing (the reason is logged).
 * args is ignored.
 */
transport_t installTransport(transfer_engine_t engine, const char *proto, void **args);

/**
 * Removes an installed transport: its peer links close and new requests route over the others;
 * requests it still held end (and fail over to the next transport when one can reach the peer).
 * Blocks until the plugin instance is destroyed (calls in progress into it return first).
 * tcp cannot be removed. 0, or ERR_INVALID_ARGUMENT when proto is not installed.
 */
int uninstallTransport(transfer_engine_t engine, const char *proto);

/** Writes "host:rpc_port" (the P2P segment name) into buf. 0 or ERR_*. */
int getLocalIpAndPort(transfer_engine_t engine, char *buf, size_t buf_len);

/** Opens a peer segment by name; returns its id or -1. */
segment_id_t openSegment(transfer_engine_t engine, const char *segment_name);

/** Opens a segment, re-fetching its descriptor even if cached; id or -1. */
segment_id_t openSegmentNoCache(transfer_engine_t engine, const char *segment_name);

/** Forgets an opened segment. 0 or ERR_*. */
int closeSegment(transfer_engine_t engine, segment_id_t segment_id);

/** Re-fetches every opened segment's descriptor. 0 or ERR_*. */
int syncSegmentCache(transfer_engine_t engine);

/**
 * Forgets the cached descriptor and links of the segment named segment_name (leading '/'
 * ignored): its id stops working and the next openSegment fetches it anew. 0 (also for a name
 * not opened), or ERR_INVALID_ARGUMENT for an empty name.
 */
int removeLocalSegment(transfer_engine_t engine, const char *segment_name);

/**
 * Opens segment_name and connects every installed transport but tcp that the peer offers (efa,
 * rdma, ...), so the first transfer pays no connection setup. Idempotent; nothing to do with
 * tcp only, an empty name or the engine's own (0). ERR_INVALID_ARGUMENT for a segment that cannot
 * be opened; another ERR_* (te_last_error names each transport) when a connection fails.
 */
int warmupEfaSegment(transfer_engine_t engine, const char *segment_name);

/**
 * The transports discover their devices and topology when they are installed; this checks
 * the handle and returns 0 (upstream re-runs its discovery here).
 */
int discoverTopology(transfer_engine_t engine);

/**
 * Writes the local NICs the transports published (device, transport, NUMA node from the
 * topology, GID) and the topology (location -> preferred and other NICs) into buf_out, as text
 * or, with json != 0, as {"local_nics":[...],"topology":{...}}; cut to buf_len as upstream.
 * Port and link speed are not known here (0). 0, or -1 on a bad handle or buffer.
 */
int showLinks(transfer_engine_t engine, char *buf_out, size_t buf_len, int json);

/**
 * Not in upstream: this process's engine metrics into buf_out, as JSON (prometheus == 0:
 * {"enabled":..., "totals":{name: sum}, "series":[{name, labels, value}]}) or in the Prometheus
 * text format (prometheus != 0); cut to buf_len like snprintf. Returns the full length (without
 * the NUL; call again with a larger buffer when it is not below buf_len), or -1 on a bad handle
 * or buffer. Recording is on when MC_TE_METRIC, MC_METRICS or MC_METRICS_PORT was set before
 * the engine was created; otherwise "enabled" is false and nothing is counted.
 */
int getMetrics(transfer_engine_t engine, char *buf_out, size_t buf_len, int prometheus);

/**
 * Per-device load from the installed plugins that report it (ABI 1.2 `stats`; TCP reports
 * none): up to *count entries copied into stats, then *count set to how many devices there
 * are (as upstream). ewma_bandwidth_bps averages the rates between successive calls (0 on the
 * first). 0, or -1 on a NULL argument or a bad handle.
 */
int getNicLoadStats(transfer_engine_t engine, nic_load_stat_t *stats, size_t *count);

/**
 * On SIGINT or SIGTERM, and at exit, shut this engine down cleanly first (its segment and
 * rpc_meta keys leave the metadata server at once); a signal then ends the process with
 * status 128 + the signal number.
 */
void enableGracefulShutdown(transfer_engine_t engine);

/** Stops the engine and frees it. The handle is invalid afterwards. */
void destroyTransferEngine(transfer_engine_t engine);

/** Registers memory peers may access; location e.g. "cpu:0" or "*". 0 or ERR_*. */
int registerLocalMemory(transfer_engine_t engine, void *addr, size_t length, const char *location, int remote_accessible);

/** Unregisters the buffer that starts at addr. 0 or ERR_*. */
int unregisterLocalMemory(transfer_engine_t engine, void *addr);

/** Registers several buffers; stops at the first failure (earlier ones stay registered). 0 or ERR_*. */
int registerLocalMemoryBatch(transfer_engine_t engine, buffer_entry_t *buffer_list, size_t buffer_len, const char *location);

/** Unregisters several buffers. 0 or the first ERR_* met (the rest are still attempted). */
int unregisterLocalMemoryBatch(transfer_engine_t engine, void **addr_list, size_t addr_len);

/** Allocates a batch of batch_size tasks; INVALID_BATCH on failure. */
batch_id_t allocateBatchID(transfer_engine_t engine, size_t batch_size);

/** Submits count requests; validates all first (nothing is sent if one is bad). Status code. */
int submitTransfer(transfer_engine_t engine, batch_id_t batch_id, struct transfer_request *entries, size_t count);

/** As submitTransfer; when every task finished, sends notify_msg to the target segment. Status code. */
int submitTransferWithNotify(transfer_engine_t engine, batch_id_t batch_id, struct transfer_request *entries, size_t count,
                             notify_msg_t notify_msg);

/** Reads a task's status. Status code. */
int getTransferStatus(transfer_engine_t engine, batch_id_t batch_id, size_t task_id, struct transfer_status *status);

/**
 * Frees a batch. Requests still in flight are canceled (they read STATUS_CANCELED) and this
 * waits up to MC_FREE_BATCH_WAIT_MS (5000) until no transport holds a slice of the batch; if
 * one still does, the batch is kept and the batch-busy status is returned (free it again later).
 */
int freeBatchID(transfer_engine_t engine, batch_id_t batch_id);

/** Received notifications as a malloc'd array (free with freeNotifsMsgBuf); NULL when none. */
notify_msg_t *getNotifsFromEngine(transfer_engine_t engine, int *size);

/** Frees what getNotifsFromEngine returned. 0. */
int freeNotifsMsgBuf(notify_msg_t *msg, int size);

/** Sends a notification to an opened segment. 0, ERR_INVALID_ARGUMENT for NULL strings, or ERR_METADATA
 * (as upstream) for an unknown segment id or a peer that does not acknowledge. */
int genNotifyInEngine(transfer_engine_t engine, uint64_t target_id, notify_msg_t notify_msg);

/* ---- Additions of this engine (not in the official header), used by the Python package. ---- */

/**
 * Creates an engine with an explicit protocol and device list (the Python
 * initialize() arguments); protocol/device_name may be NULL or "" to use the
 * environment and config file. NULL on failure.
 */
transfer_engine_t createTransferEngineExt(const char *metadata_conn_string, const char *local_hostname,
                                          const char *protocol, const char *device_name);

/** The protocol the engine runs (after any fallback), copied into buf. 0 or ERR_*. */
int te_active_protocol(transfer_engine_t engine, char *buf, size_t buf_len);

/** One blocking transfer (opcode OPCODE_READ/OPCODE_WRITE). 0 or ERR_*. */
int te_transfer_sync(transfer_engine_t engine, segment_id_t segment, int opcode, void *local, uint64_t remote, uint64_t length);

/**
 * te_transfer_sync with a transport hint (upstream's transport_hint): that transport is tried
 * first when installed and the peer offers it; a name not installed is ignored with one
 * warning (an error under MC_STRICT_PROTOCOL=1). NULL or "" routes as usual.
 */
int te_transfer_sync_hint(transfer_engine_t engine, segment_id_t segment, int opcode, void *local, uint64_t remote,
                          uint64_t length, const char *hint);

/** submitTransfer with a transport hint, as te_transfer_sync_hint. 0 or a status code. */
int te_submit_transfer_hint(transfer_engine_t engine, batch_id_t batch_id, struct transfer_request *entries, size_t count,
                            const char *hint);

/**
 * allocateBatchID whose requests must end within timeout_ms of their submission (instead of
 * MC_TRANSFER_TIMEOUT plus 1 ns per byte); a request still pending then reads STATUS_TIMEOUT
 * once its transport gave it back (tcp stops at the deadline; a plugin's request reads it
 * MC_FREE_BATCH_WAIT_MS after the deadline at the latest, its buffer possibly still in use).
 * INVALID_BATCH on a bad size or a timeout outside 1 ms .. 24 h.
 */
batch_id_t te_allocate_batch_timeout(transfer_engine_t engine, size_t batch_size, uint64_t timeout_ms);

/** Writes every installed transport, comma-separated in routing order (tcp last), into buf. */
int te_active_protocols(transfer_engine_t engine, char *buf, size_t buf_len);

/**
 * Waits until every task of the batch finished or timeout_ms passed.
 * Returns 1 all completed, -1 some task failed, 0 still pending at the timeout, or ERR_*.
 */
int te_wait_batch(transfer_engine_t engine, batch_id_t batch_id, uint64_t timeout_ms);

/** Address of the first buffer of an opened segment's descriptor, 0 if none or on error. */
uint64_t te_first_buffer_address(transfer_engine_t engine, segment_id_t segment);

/** Sends a Probe to a segment name's handshake port. 0 or ERR_*. */
int te_send_probe(transfer_engine_t engine, const char *segment_name);

/** 1 if the protocol can run here (tcp always; a plugin that loads and probes as available), else 0. */
int te_protocol_available(const char *protocol);

/**
 * Allocates length bytes at location (NULL or "": "cpu:0") and registers them: memory a
 * transport provides itself when one does (a CXL pool, device memory of a GPU plugin for
 * "cuda:N"), the first in routing order, else page-aligned heap memory. NULL on failure.
 */
void *te_allocate_managed_buffer(transfer_engine_t engine, size_t length, const char *location);

/** Unregisters and frees what te_allocate_managed_buffer returned. 0 or ERR_*. */
int te_free_managed_buffer(transfer_engine_t engine, void *addr);

/**
 * A batch to run later from a GPU stream (upstream's *_on_cuda): copies count requests (one
 * segment or several; hint as te_submit_transfer_hint, NULL for none) into a job and returns it,
 * or NULL with te_last_error set. Pass te_stream_job_run as the host function and the job as
 * its user data to cudaLaunchHostFunc; if the launch fails, te_stream_job_discard(job). Each job
 * is used once: a pointer already run or discarded (or never returned here) is ignored.
 */
void *te_stream_job_create(transfer_engine_t engine, struct transfer_request *entries, size_t count, const char *hint);

/**
 * Runs a job's batch and waits for it (on the stream's host-function thread), then frees the
 * job; a failure is kept for te_stream_failures. Takes no interpreter lock and no caller state.
 * A job whose engine was destroyed moves nothing: synchronize the stream before
 * destroyTransferEngine (te_stream_jobs_pending tells whether jobs are still queued).
 */
void te_stream_job_run(void *job);

/** Frees a job that will not run (its launch failed). */
void te_stream_job_discard(void *job);

/** Jobs made for this engine and not yet run or discarded, or -1 for a bad handle. */
int te_stream_jobs_pending(transfer_engine_t engine);

/**
 * Why this engine's stream jobs failed, oldest first, one per line (at most 100 kept, each cut at
 * 1024 characters), copied NUL-terminated into buf. Returns the text's length (0 when none), or
 * minus the size needed (at most -2) when buf_len is too small, or -1 for a bad handle.
 */
int te_stream_failures(transfer_engine_t engine, char *buf, size_t buf_len);

/** The last error on the calling thread ("" if none). Valid until the next call on this thread. */
const char *te_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* TRANSFER_ENGINE_C_H */
