/* Thin C wrappers over libibverbs for the rdma plugin: opaque handles and
 * plain functions instead of verbs' inline functions, unions and macros.
 * Functions return 0 (or a count) on success and a negative errno on failure. */
#ifndef RDMA_SHIM_H
#define RDMA_SHIM_H
#include <stddef.h>
#include <stdint.h>

/** GID types, from ibv_query_gid_table. */
#define RDMA_GID_IB 0
#define RDMA_GID_ROCE_V1 1
#define RDMA_GID_ROCE_V2 2

/** One usable GID table entry of a port. */
typedef struct rdma_gid {
    uint8_t raw[16];
    uint32_t index;
    uint32_t type;          /**< RDMA_GID_* */
    uint32_t netdev_index;  /**< ifindex of the netdev it belongs to (0: none) */
} rdma_gid;

/** One RDMA device (HCA) as discovery sees it. */
typedef struct rdma_device_info {
    char name[64];
    uint32_t port;          /**< the first ACTIVE port, 0 when none */
    uint32_t port_count;
    uint16_t lid;
    uint8_t link_layer_ethernet;
    uint8_t reserved;
    uint32_t active_mtu;    /**< IBV_MTU_* enum value (1=256 .. 5=4096) */
    uint64_t max_mr_size;
    uint32_t max_qp_wr;
    uint32_t vendor_id;     /**< ibv_device_attr.vendor_id (0xffffff: soft-RoCE, rdma_rxe) */
    uint32_t gid_count;     /**< entries written to gids */
    rdma_gid gids[16];
} rdma_device_info;

/**
 * Lists the devices. Returns how many were found (all of them, even beyond
 * capacity), or -errno. A machine without the RDMA kernel stack makes
 * ibv_get_device_list fail with ENOSYS: that returns -ENOSYS.
 */
int rdma_list_devices(rdma_device_info *out, size_t capacity);

/** An opened device: context, protection domain, completion channel and queue. */
typedef struct rdma_context rdma_context;
/** A reliable-connected queue pair. */
typedef struct rdma_qp rdma_qp;

/** Opens `name` (port `port`) with a completion queue of `cq_depth` entries. */
int rdma_open(const char *name, uint32_t port, int cq_depth, rdma_context **out);
/** Closes a context; its QPs and memory regions must be gone. */
void rdma_close(rdma_context *context);

/** Registers memory for local write and remote read/write. */
int rdma_reg_mr(rdma_context *context, void *addr, size_t length, void **mr, uint32_t *lkey, uint32_t *rkey);
/** Deregisters. */
int rdma_dereg_mr(void *mr);

/** Creates an RC QP on the context's CQ (RESET state). *qp_num gets its number. */
int rdma_create_qp(rdma_context *context, uint32_t max_send_wr, uint32_t max_inline, rdma_qp **out, uint32_t *qp_num);
/** Destroys a QP (flushing what is posted). */
void rdma_destroy_qp(rdma_qp *qp);

/** Path parameters for RESET -> INIT -> RTR -> RTS. */
typedef struct rdma_path {
    uint32_t port;
    uint32_t gid_index;     /**< local sgid index */
    uint32_t mtu;           /**< IBV_MTU_* */
    uint32_t remote_qp_num;
    uint16_t remote_lid;
    uint8_t remote_gid[16];
    uint8_t traffic_class;
    uint8_t service_level;
    uint8_t timeout;
    uint8_t retry_count;
    uint8_t rnr_retry;
} rdma_path;

/** Moves a QP to the error state: everything posted on it completes with a flush error. */
int rdma_qp_to_error(rdma_qp *qp);
/** Connects a QP to its peer QP. */
int rdma_connect_qp(rdma_qp *qp, const rdma_path *path);

/** Posts one signalled RDMA WRITE (is_write) or READ. Returns 0 or -errno (ENOMEM: send queue full). */
int rdma_post(rdma_qp *qp, int is_write, uint64_t local, uint32_t length, uint32_t lkey, uint64_t remote, uint32_t rkey,
              uint64_t wr_id, uint32_t max_inline);

/** A work completion. */
typedef struct rdma_completion {
    uint64_t wr_id;
    int32_t status;         /**< IBV_WC_SUCCESS (0) or an error */
    uint32_t qp_num;
} rdma_completion;

/** Polls up to capacity completions; returns the count or -errno. */
int rdma_poll(rdma_context *context, rdma_completion *out, int capacity);
/** Text for a work-completion status. */
const char *rdma_wc_status_text(int32_t status);
/** Arms the CQ for the next completion event. */
int rdma_arm(rdma_context *context);
/**
 * Sleeps until a completion event or rdma_wake, at most timeout_ms; consumes
 * and acknowledges the event. Returns 1 (event), 0 (woken / timed out) or -errno.
 */
int rdma_sleep(rdma_context *context, int timeout_ms);
/**
 * Sleeps on the completion channel alone (not the wake fd) at most timeout_us; consumes and
 * acknowledges the event. Returns 1 (event), 0 (timed out, or another thread took the event)
 * or -errno. For a synchronous caller that waits for its own completion.
 */
int rdma_wait_event(rdma_context *context, int64_t timeout_us);
/** Wakes a thread in rdma_sleep. */
void rdma_wake(rdma_context *context);

/** NUMA node of the page at addr (move_pages), or -1. */
int rdma_numa_node_of(const void *addr);

/* GPU memory (GPUDirect RDMA). The CUDA driver is bound with dlopen, so the plugin builds and
 * loads without it. */

/**
 * PCI bus ids ("0000:3b:00.0", lower case) of the CUDA devices, in CUDA's device order
 * (CUDA_VISIBLE_DEVICES applies), into `ids` as `capacity` NUL-terminated entries of
 * RDMA_BUS_ID_SIZE bytes: the count, or -1 when the CUDA driver cannot be loaded or initialised
 * (then there are no cuda:N locations).
 */
int rdma_cuda_bus_ids(char *ids, int capacity);
/** Bytes per entry of rdma_cuda_bus_ids. */
#define RDMA_BUS_ID_SIZE 32
/**
 * Registers device memory through a dma-buf exported by the CUDA driver
 * (cuMemGetHandleForAddressRange, CUDA >= 11.7) and ibv_reg_dmabuf_mr: the path that needs no
 * nvidia-peermem module. 0 or -errno; -ENOSYS when the driver lacks the entry point.
 */
int rdma_reg_dmabuf_mr(rdma_context *context, void *addr, size_t length, void **mr, uint32_t *lkey, uint32_t *rkey);
/**
 * Allocates `length` bytes on CUDA device `ordinal` (its primary context, cuMemAlloc) with
 * synchronous memory operations set (CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, so RDMA and CUDA copies
 * see each other's writes in order). 0, -ENOSYS (no CUDA driver), -ENODEV (no such device) or
 * -ENOMEM.
 */
int rdma_cuda_alloc(int ordinal, size_t length, void **addr);
/** Frees memory from rdma_cuda_alloc on device `ordinal`; 0 or -EINVAL. */
int rdma_cuda_free(int ordinal, void *addr);
#endif
