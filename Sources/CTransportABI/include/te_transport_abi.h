/*
 * te_transport_abi.h - the transport plugin ABI of the Swift Transfer Engine.
 *
 * A transport plugin is a shared object named libtransport_<protocol>.so that
 * exports ONE C symbol, TE_PLUGIN_ENTRY_SYMBOL, returning a pointer to a
 * static te_plugin_descriptor. Everything between the host engine and a
 * plugin crosses this header: plain C types, no C++ and no Swift objects, so
 * a plugin may be written in C, C++, Rust or Swift (@c / @_cdecl).
 *
 * Versioning
 *   - abi_major changes only when an existing field changes meaning; the host
 *     rejects any other major.
 *   - abi_minor grows when fields are APPENDED to a struct. Every struct that
 *     can grow starts with (or carries) its own size, so an older host reads
 *     the prefix it knows and a newer host checks struct_size before touching
 *     a newer field. The host rejects a descriptor smaller than
 *     TE_PLUGIN_DESCRIPTOR_V1_SIZE.
 *
 * Threading
 *   - probe/create/destroy are called once, from one thread.
 *   - All other calls may come from several host threads at once; a plugin
 *     serialises internally where it must. submit and poll never block for
 *     I/O (poll may wait for at most its timeout argument).
 *
 * Memory ownership
 *   - Strings the plugin returns through te_buffer are copied by the host
 *     before the call returns. const char * fields of the descriptor live as
 *     long as the loaded object (the host never dlclose()s a plugin).
 */
#ifndef TE_TRANSPORT_ABI_H
#define TE_TRANSPORT_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** ABI major version: must equal the host's. */
#define TE_ABI_MAJOR 1
/** ABI minor version: fields appended since v1.0. */
#define TE_ABI_MINOR 2

/** The one symbol every plugin exports: `const te_plugin_descriptor *te_transport_plugin_entry(void)`. */
#define TE_PLUGIN_ENTRY_SYMBOL "te_transport_plugin_entry"

/* ------------------------------------------------------------------------ */
/* Status codes. Stable: never renumbered. Zero is success, errors are < 0.  */

#define TE_OK 0
/** A caller-supplied argument is malformed (bad JSON, null pointer, zero length). */
#define TE_ERR_INVALID_ARGUMENT (-1)
/** The plugin's library loaded but the hardware it drives is not present or not usable. */
#define TE_ERR_HARDWARE_ABSENT (-2)
/** A library the plugin binds at run time (dlopen of a vendor stack) is not installed. */
#define TE_ERR_LIBRARY_MISSING (-3)
/** The operation or memory kind is not supported by this plugin. */
#define TE_ERR_NOT_SUPPORTED (-4)
/** Out of memory or another resource (queue pairs, registrations). */
#define TE_ERR_NO_RESOURCES (-5)
/** The te_buffer was too small; its `length` holds the size needed (without NUL). */
#define TE_ERR_BUFFER_TOO_SMALL (-6)
/** An address range is not inside one registered buffer (local or remote). */
#define TE_ERR_OUT_OF_RANGE (-7)
/** The peer cannot be reached or has gone away. */
#define TE_ERR_PEER_UNREACHABLE (-8)
/** Submission queue full: poll completions, then submit the rest again. */
#define TE_ERR_AGAIN (-9)
/** The transfer failed on the wire or in the device. */
#define TE_ERR_IO (-10)
/** The operation did not finish in time. */
#define TE_ERR_TIMEOUT (-11)
/** A bug or an unexpected state inside the plugin. */
#define TE_ERR_INTERNAL (-12)
/** The peer refused the request (bad handshake, rejected address). */
#define TE_ERR_REJECTED (-13)

/* ------------------------------------------------------------------------ */
/* Capability flags (te_plugin_descriptor.capabilities).                     */

/** Moves host DRAM. */
#define TE_CAP_MEM_HOST (1ULL << 0)
/** Moves accelerator (GPU/NPU) memory. */
#define TE_CAP_MEM_DEVICE (1ULL << 1)
/** Moves storage (block devices, files, NVMe namespaces). */
#define TE_CAP_MEM_STORAGE (1ULL << 2)
/** Supports TE_OP_READ (pull from the peer). */
#define TE_CAP_OP_READ (1ULL << 8)
/** Supports TE_OP_WRITE (push to the peer). */
#define TE_CAP_OP_WRITE (1ULL << 9)
/** Can deliver notifications itself (otherwise the host sends them over its handshake port). */
#define TE_CAP_OP_NOTIFY (1ULL << 10)
/** Needs a connection handshake (on_handshake / host->handshake_send) before data moves. */
#define TE_CAP_NEEDS_HANDSHAKE (1ULL << 16)
/** Cuts large requests itself (slices, max message size): the host hands it whole requests rather
 *  than MC_TCP_SPLIT_SIZE pieces. */
#define TE_CAP_SPLITS_REQUESTS (1ULL << 17)

/* ------------------------------------------------------------------------ */
/* Operations and log levels.                                                */

/** Copy remote -> local. */
#define TE_OP_READ 0u
/** Copy local -> remote. */
#define TE_OP_WRITE 1u

#define TE_LOG_TRACE 0
#define TE_LOG_DEBUG 1
#define TE_LOG_INFO 2
#define TE_LOG_WARNING 3
#define TE_LOG_ERROR 4

/* ------------------------------------------------------------------------ */
/* Data types.                                                               */

/** Opaque plugin instance. */
typedef struct te_instance te_instance;

/**
 * Caller-owned output text. The callee writes at most capacity-1 bytes plus a
 * NUL into data and sets length to the FULL length of the text. When length
 * >= capacity the call returns TE_ERR_BUFFER_TOO_SMALL and the caller retries
 * with a buffer of length+1 bytes.
 */
typedef struct te_buffer {
    char *data;
    size_t capacity;
    size_t length;
} te_buffer;

/** One transfer handed to submit(). Passed as an array with an explicit stride. */
typedef struct te_request {
    uint32_t opcode;       /**< TE_OP_READ or TE_OP_WRITE */
    uint32_t flags;        /**< reserved, 0 */
    uint64_t local_addr;   /**< absolute address in this process, inside a registered buffer */
    uint64_t peer;         /**< handle from open_peer */
    uint64_t remote_addr;  /**< absolute address in the peer process (Mooncake semantics) */
    uint64_t length;       /**< bytes, > 0 */
    uint64_t cookie;       /**< opaque to the plugin; returned in the completion */
} te_request;

/** One finished transfer reported by poll(). */
typedef struct te_completion {
    uint64_t cookie;  /**< the request's cookie */
    int32_t status;   /**< TE_OK or a TE_ERR_* code */
    uint32_t flags;   /**< reserved, 0 */
    uint64_t bytes;   /**< bytes moved */
} te_completion;

/**
 * Services the host lends a plugin instance (passed to create; valid until
 * destroy). A plugin must check struct_size before using a field appended
 * after v1.0.
 */
typedef struct te_host_services {
    uint32_t struct_size;
    uint32_t reserved;
    void *host_context;
    /** Writes one log line through the host's logger. */
    void (*log)(void *host_context, int32_t level, const char *message);
    /**
     * Sends a Connection handshake (JSON) to the peer segment's handshake port
     * and waits for its reply, which is written to reply. Returns TE_OK or an
     * error code. The host carries it on its own port so a plugin needs no side
     * channel.
     */
    int32_t (*handshake_send)(void *host_context, const char *peer_segment,
                              const char *request_json, te_buffer *reply);
    /** Monotonic clock in nanoseconds. */
    uint64_t (*now_ns)(void *host_context);
} te_host_services;

/**
 * The plugin descriptor returned by the entry symbol. Fields are only ever
 * appended; the host reads struct_size bytes of it.
 */
typedef struct te_plugin_descriptor {
    uint16_t abi_major;        /**< TE_ABI_MAJOR the plugin was built against */
    uint16_t abi_minor;        /**< TE_ABI_MINOR the plugin was built against */
    uint32_t struct_size;      /**< sizeof(te_plugin_descriptor) in the plugin's header */
    const char *name;          /**< plugin name, e.g. "rdma" */
    const char *version;       /**< plugin version string, e.g. "0.1.0" */
    const char *protocols;     /**< comma-separated protocol names served, e.g. "rdma" */
    uint64_t capabilities;     /**< TE_CAP_* flags */

    /**
     * Checks whether the plugin can run here without creating anything.
     * Returns TE_OK, TE_ERR_HARDWARE_ABSENT or TE_ERR_LIBRARY_MISSING (or
     * another error); reason gets a human sentence, hint what to install or set.
     * options_json: the same options create() gets (may be NULL).
     */
    int32_t (*probe)(const char *options_json, te_buffer *reason, te_buffer *hint);

    /**
     * Creates an instance. options_json is an object with at least
     * "device_name", "local_hostname", "segment_name" and "options" (an object
     * of string values taken from MC_* settings); since 1.1 also "protocol",
     * the protocol the plugin is loaded for (a plugin may serve several).
     */
    int32_t (*create)(const char *options_json, const te_host_services *host, te_instance **out);

    /** Destroys an instance; no call on it follows. */
    void (*destroy)(te_instance *instance);

    /**
     * A JSON object whose keys the host merges into the top level of the
     * local segment descriptor (e.g. "devices", "priority_matrix"). A
     * "buffers" array is not merged but appended to the registered buffers:
     * ranges the plugin serves itself (e.g. NVMe namespaces), each an object
     * with "name", "addr", "length" and the plugin's own keys.
     * Any buffer entry (these, or a register_memory fragment) may carry
     * "protocol": peers then route requests into that buffer through the
     * named transport ("tcp" for memory the plugin does not serve) instead of
     * the segment's protocol.
     */
    int32_t (*local_descriptor)(te_instance *instance, te_buffer *fragment_json);

    /**
     * Registers [addr, addr+length). location is "cpu:0", "cuda:1", "*" ...
     * fragment_json receives a JSON object merged into this buffer's entry of
     * the segment descriptor (e.g. {"rkey":[..],"lkey":[..]}).
     */
    int32_t (*register_memory)(te_instance *instance, uint64_t addr, uint64_t length,
                               const char *location, te_buffer *fragment_json);

    /** Unregisters the buffer that starts at addr. */
    int32_t (*unregister_memory)(te_instance *instance, uint64_t addr);

    /**
     * Prepares to talk to a peer, given the peer's full segment descriptor
     * JSON. Returns a nonzero handle used in te_request.peer. May perform the
     * connection handshake through host->handshake_send.
     */
    int32_t (*open_peer)(te_instance *instance, const char *peer_segment,
                         const char *peer_descriptor_json, uint64_t *peer);

    /** Forgets a peer handle (e.g. after the peer re-registered memory). */
    void (*close_peer)(te_instance *instance, uint64_t peer);

    /**
     * Answers a Connection handshake that a peer sent to this host's handshake
     * port. reply gets the JSON answer.
     */
    int32_t (*on_handshake)(te_instance *instance, const char *request_json, te_buffer *reply);

    /**
     * Queues count requests (array with stride bytes between elements, stride
     * >= the v1 sizeof(te_request)). Never blocks. *accepted is how many were
     * queued; on TE_ERR_AGAIN the caller polls and resubmits the rest.
     */
    int32_t (*submit)(te_instance *instance, const te_request *requests, size_t count,
                      size_t stride, size_t *accepted);

    /**
     * Reports up to capacity finished requests into out (stride as in submit)
     * and sets *count. Waits at most timeout_ns for the first completion
     * (0: do not wait).
     */
    int32_t (*poll)(te_instance *instance, te_completion *out, size_t capacity, size_t stride,
                    uint64_t timeout_ns, size_t *count);

    /** Text of the last error on the calling thread for this instance (never NULL). */
    const char *(*last_error)(te_instance *instance);

    /* ---- ABI 1.1 (the host checks struct_size before using these) ---- */

    /**
     * Optional (NULL when not offered): allocates length bytes of the memory this
     * transport serves (e.g. a slice of a shared CXL pool) and sets *addr. The host
     * registers it with register_memory like any other buffer. location as in
     * register_memory. TE_ERR_NOT_SUPPORTED means "not for this location": the host
     * then allocates that buffer itself (a GPU plugin asked for cpu:0 memory).
     */
    int32_t (*allocate_memory)(te_instance *instance, uint64_t length, const char *location, uint64_t *addr);

    /** Optional: returns memory from allocate_memory (after the host unregistered it). */
    int32_t (*free_memory)(te_instance *instance, uint64_t addr);

    /* ---- ABI 1.2 ---- */

    /**
     * Optional (NULL when not offered): the instance's figures per device, as one JSON
     * object written into out: {"devices":[{"name":"mlx5_0","bytes_read":N,
     * "bytes_written":N,"inflight_bytes":N,"errors":N}]}. Counters run from create; the
     * host derives rates (getNicLoadStats, metrics). TE_ERR_BUFFER_TOO_SMALL with
     * out->length set when it does not fit; TE_ERR_NOT_SUPPORTED when this instance keeps
     * none. Called from any thread, at any time between create and destroy.
     */
    int32_t (*stats)(te_instance *instance, te_buffer *out);
} te_plugin_descriptor;

/** The smallest descriptor a v1 host accepts: every field up to last_error (ABI 1.0). */
#define TE_PLUGIN_DESCRIPTOR_V1_SIZE \
    (offsetof(te_plugin_descriptor, last_error) + sizeof(void *))

/** Type of the entry symbol. */
typedef const te_plugin_descriptor *(*te_plugin_entry_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* TE_TRANSPORT_ABI_H */
