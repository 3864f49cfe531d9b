#define _GNU_SOURCE
#include "rdma_shim.h"
#include <infiniband/verbs.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

struct rdma_context {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_comp_channel *channel;
    struct ibv_cq *cq;
    uint32_t port;
    int wake_fd;
};

struct rdma_qp {
    struct ibv_qp *qp;
    rdma_context *context;
};

static int neg_errno(int fallback) { return errno ? -errno : -fallback; }

int rdma_list_devices(rdma_device_info *out, size_t capacity) {
    int count = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&count);
    if (!list) return neg_errno(ENODEV);
    for (int i = 0; i < count && (size_t)i < capacity; i++) {
        rdma_device_info *info = &out[i];
        memset(info, 0, sizeof *info);
        strncpy(info->name, ibv_get_device_name(list[i]), sizeof info->name - 1);
        struct ibv_context *ctx = ibv_open_device(list[i]);
        if (!ctx) continue;
        struct ibv_device_attr dev;
        if (ibv_query_device(ctx, &dev) == 0) {
            info->port_count = dev.phys_port_cnt;
            info->max_mr_size = dev.max_mr_size;
            info->max_qp_wr = (uint32_t)dev.max_qp_wr;
            info->vendor_id = dev.vendor_id;
        }
        for (uint32_t p = 1; p <= info->port_count && info->port == 0; p++) {
            struct ibv_port_attr attr;
            if (ibv_query_port(ctx, (uint8_t)p, &attr) || attr.state != IBV_PORT_ACTIVE) continue;
            info->port = p;
            info->lid = attr.lid;
            info->active_mtu = attr.active_mtu;
            info->link_layer_ethernet = attr.link_layer == IBV_LINK_LAYER_ETHERNET;
            struct ibv_gid_entry entries[64];
            ssize_t n = ibv_query_gid_table(ctx, entries, 64, 0);
            for (ssize_t k = 0; k < n && info->gid_count < 16; k++) {
                if (entries[k].port_num != p) continue;
                static const uint8_t zero[16];
                if (!memcmp(entries[k].gid.raw, zero, 16)) continue;
                rdma_gid *g = &info->gids[info->gid_count++];
                memcpy(g->raw, entries[k].gid.raw, 16);
                g->index = entries[k].gid_index;
                g->type = entries[k].gid_type == IBV_GID_TYPE_ROCE_V2 ? RDMA_GID_ROCE_V2
                        : entries[k].gid_type == IBV_GID_TYPE_ROCE_V1 ? RDMA_GID_ROCE_V1 : RDMA_GID_IB;
                g->netdev_index = entries[k].ndev_ifindex;
            }
        }
        ibv_close_device(ctx);
    }
    ibv_free_device_list(list);
    return count;
}

int rdma_open(const char *name, uint32_t port, int cq_depth, rdma_context **out) {
    int count = 0;
    errno = 0;
    struct ibv_device **list = ibv_get_device_list(&count);
    if (!list) return neg_errno(ENODEV);
    struct ibv_device *device = NULL;
    for (int i = 0; i < count; i++) if (!strcmp(ibv_get_device_name(list[i]), name)) device = list[i];
    if (!device) { ibv_free_device_list(list); return -ENODEV; }
    rdma_context *c = calloc(1, sizeof *c);
    if (!c) { ibv_free_device_list(list); return -ENOMEM; }
    c->port = port;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int r = 0;
    errno = 0;
    if (!(c->ctx = ibv_open_device(device))) r = neg_errno(ENODEV);
    else if (!(c->pd = ibv_alloc_pd(c->ctx))) r = neg_errno(ENOMEM);
    else if (!(c->channel = ibv_create_comp_channel(c->ctx))) r = neg_errno(ENOMEM);
    else if (!(c->cq = ibv_create_cq(c->ctx, cq_depth, NULL, c->channel, 0))) r = neg_errno(ENOMEM);
    /* Non-blocking: several threads may sleep on the channel (the completion thread and a
     * synchronous caller); the one that loses the event must not block in its read. */
    else if (fcntl(c->channel->fd, F_SETFL, fcntl(c->channel->fd, F_GETFL) | O_NONBLOCK) != 0) r = neg_errno(EINVAL);
    ibv_free_device_list(list);
    if (r) { rdma_close(c); return r; }
    *out = c;
    return 0;
}

void rdma_close(rdma_context *c) {
    if (!c) return;
    if (c->cq) ibv_destroy_cq(c->cq);
    if (c->channel) ibv_destroy_comp_channel(c->channel);
    if (c->pd) ibv_dealloc_pd(c->pd);
    if (c->ctx) ibv_close_device(c->ctx);
    if (c->wake_fd >= 0) close(c->wake_fd);
    free(c);
}

int rdma_reg_mr(rdma_context *c, void *addr, size_t length, void **mr_out, uint32_t *lkey, uint32_t *rkey) {
    errno = 0;
    struct ibv_mr *mr = ibv_reg_mr(c->pd, addr, length, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
    if (!mr) return neg_errno(ENOMEM);
    *mr_out = mr;
    *lkey = mr->lkey;
    *rkey = mr->rkey;
    return 0;
}

int rdma_dereg_mr(void *mr) { return mr ? -ibv_dereg_mr(mr) : 0; }

int rdma_create_qp(rdma_context *c, uint32_t max_send_wr, uint32_t max_inline, rdma_qp **out, uint32_t *qp_num) {
    struct ibv_qp_init_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.send_cq = c->cq;
    attr.recv_cq = c->cq;
    attr.qp_type = IBV_QPT_RC;
    attr.sq_sig_all = 0;
    attr.cap.max_send_wr = max_send_wr;
    attr.cap.max_recv_wr = 1;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    attr.cap.max_inline_data = max_inline;
    rdma_qp *q = calloc(1, sizeof *q);
    if (!q) return -ENOMEM;
    errno = 0;
    q->qp = ibv_create_qp(c->pd, &attr);
    if (!q->qp) { int r = neg_errno(ENOMEM); free(q); return r; }
    q->context = c;
    *qp_num = q->qp->qp_num;
    *out = q;
    return 0;
}

void rdma_destroy_qp(rdma_qp *q) {
    if (!q) return;
    ibv_destroy_qp(q->qp);
    free(q);
}

int rdma_connect_qp(rdma_qp *q, const rdma_path *path) {
    struct ibv_qp_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.qp_state = IBV_QPS_INIT;
    attr.port_num = (uint8_t)path->port;
    attr.pkey_index = 0;
    attr.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    int r = ibv_modify_qp(q->qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
    if (r) return -r;

    memset(&attr, 0, sizeof attr);
    attr.qp_state = IBV_QPS_RTR;
    attr.path_mtu = (enum ibv_mtu)path->mtu;
    attr.dest_qp_num = path->remote_qp_num;
    attr.rq_psn = 0;
    attr.max_dest_rd_atomic = 16;
    attr.min_rnr_timer = 12;
    attr.ah_attr.is_global = 1;
    memcpy(attr.ah_attr.grh.dgid.raw, path->remote_gid, 16);
    attr.ah_attr.grh.sgid_index = (uint8_t)path->gid_index;
    attr.ah_attr.grh.hop_limit = 16;
    attr.ah_attr.grh.traffic_class = path->traffic_class;
    attr.ah_attr.dlid = path->remote_lid;
    attr.ah_attr.sl = path->service_level;
    attr.ah_attr.port_num = (uint8_t)path->port;
    r = ibv_modify_qp(q->qp, &attr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                     IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
    if (r) return -r;

    memset(&attr, 0, sizeof attr);
    attr.qp_state = IBV_QPS_RTS;
    attr.timeout = path->timeout;
    attr.retry_cnt = path->retry_count;
    attr.rnr_retry = path->rnr_retry;
    attr.sq_psn = 0;
    attr.max_rd_atomic = 16;
    r = ibv_modify_qp(q->qp, &attr, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                     IBV_QP_MAX_QP_RD_ATOMIC);
    return r ? -r : 0;
}

int rdma_post(rdma_qp *q, int is_write, uint64_t local, uint32_t length, uint32_t lkey, uint64_t remote, uint32_t rkey,
              uint64_t wr_id, uint32_t max_inline) {
    struct ibv_sge sge = { .addr = local, .length = length, .lkey = lkey };
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof wr);
    wr.wr_id = wr_id;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = is_write ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
    wr.send_flags = IBV_SEND_SIGNALED | ((is_write && length <= max_inline) ? IBV_SEND_INLINE : 0);
    wr.wr.rdma.remote_addr = remote;
    wr.wr.rdma.rkey = rkey;
    int r = ibv_post_send(q->qp, &wr, &bad);
    return r ? -r : 0;
}

int rdma_poll(rdma_context *c, rdma_completion *out, int capacity) {
    struct ibv_wc wc[32];
    if (capacity > 32) capacity = 32;
    int n = ibv_poll_cq(c->cq, capacity, wc);
    if (n < 0) return -EIO;
    for (int i = 0; i < n; i++) {
        out[i].wr_id = wc[i].wr_id;
        out[i].status = wc[i].status;
        out[i].qp_num = wc[i].qp_num;
    }
    return n;
}

const char *rdma_wc_status_text(int32_t status) { return ibv_wc_status_str((enum ibv_wc_status)status); }

int rdma_arm(rdma_context *c) { return -ibv_req_notify_cq(c->cq, 0); }

/* Consumes and acknowledges one completion event if there is one; returns 1 if so. */
static int take_event(rdma_context *c) {
    struct ibv_cq *cq;
    void *cq_context;
    if (ibv_get_cq_event(c->channel, &cq, &cq_context) != 0) return 0;
    ibv_ack_cq_events(cq, 1);
    return 1;
}

int rdma_sleep(rdma_context *c, int timeout_ms) {
    struct pollfd fds[2] = { { .fd = c->wake_fd, .events = POLLIN }, { .fd = c->channel->fd, .events = POLLIN } };
    int r = poll(fds, 2, timeout_ms);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    if (fds[0].revents & POLLIN) {
        uint64_t value;
        ssize_t ignored = read(c->wake_fd, &value, sizeof value);
        (void)ignored;
    }
    return (fds[1].revents & POLLIN) ? take_event(c) : 0;
}

int rdma_wait_event(rdma_context *c, int64_t timeout_us) {
    struct pollfd fd = { .fd = c->channel->fd, .events = POLLIN };
    struct timespec timeout = { .tv_sec = timeout_us / 1000000, .tv_nsec = (timeout_us % 1000000) * 1000 };
    int r = ppoll(&fd, 1, &timeout, NULL);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    return (fd.revents & POLLIN) ? take_event(c) : 0;
}

void rdma_wake(rdma_context *c) {
    uint64_t one = 1;
    ssize_t ignored = write(c->wake_fd, &one, sizeof one);
    (void)ignored;
}

int rdma_numa_node_of(const void *addr) {
    void *pages[1] = { (void *)((uintptr_t)addr & ~(uintptr_t)4095) };
    int status[1] = { -1 };
    if (syscall(SYS_move_pages, 0, 1, pages, NULL, status, 0) != 0) return -1;
    return status[0] >= 0 ? status[0] : -1;
}

int rdma_qp_to_error(rdma_qp *q) {
    struct ibv_qp_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.qp_state = IBV_QPS_ERR;
    return -ibv_modify_qp(q->qp, &attr, IBV_QP_STATE);
}

/* The few CUDA driver entry points used here, declared with the driver API's types and values
 * (cuda.h: CUresult and CUdevice are int, CUdeviceptr is unsigned long long,
 * CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD is 1). */
typedef int (*cu_init_fn)(unsigned int);
typedef int (*cu_device_get_count_fn)(int *);
typedef int (*cu_device_get_fn)(int *, int);
typedef int (*cu_device_get_pci_bus_id_fn)(char *, int, int);
typedef int (*cu_mem_get_handle_for_address_range_fn)(void *, unsigned long long, size_t, int, unsigned long long);
typedef int (*cu_primary_ctx_retain_fn)(void **, int);
typedef int (*cu_ctx_set_current_fn)(void *);
typedef int (*cu_mem_alloc_fn)(unsigned long long *, size_t);
typedef int (*cu_mem_free_fn)(unsigned long long);
typedef int (*cu_pointer_set_attribute_fn)(const void *, int, unsigned long long);

static struct {
    pthread_once_t once;
    int ready;
    cu_device_get_count_fn device_get_count;
    cu_device_get_fn device_get;
    cu_device_get_pci_bus_id_fn device_get_pci_bus_id;
    cu_mem_get_handle_for_address_range_fn mem_get_handle_for_address_range;
    cu_primary_ctx_retain_fn primary_ctx_retain;
    cu_ctx_set_current_fn ctx_set_current;
    cu_mem_alloc_fn mem_alloc;
    cu_mem_free_fn mem_free;
    cu_pointer_set_attribute_fn pointer_set_attribute;
} cuda = { PTHREAD_ONCE_INIT, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL };

static void cuda_load(void) {
    void *library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!library) return;
    cu_init_fn init = (cu_init_fn)dlsym(library, "cuInit");
    cuda.device_get_count = (cu_device_get_count_fn)dlsym(library, "cuDeviceGetCount");
    cuda.device_get = (cu_device_get_fn)dlsym(library, "cuDeviceGet");
    cuda.device_get_pci_bus_id = (cu_device_get_pci_bus_id_fn)dlsym(library, "cuDeviceGetPCIBusId");
    cuda.mem_get_handle_for_address_range = (cu_mem_get_handle_for_address_range_fn)dlsym(library, "cuMemGetHandleForAddressRange");
    cuda.primary_ctx_retain = (cu_primary_ctx_retain_fn)dlsym(library, "cuDevicePrimaryCtxRetain");
    cuda.ctx_set_current = (cu_ctx_set_current_fn)dlsym(library, "cuCtxSetCurrent");
    cuda.mem_alloc = (cu_mem_alloc_fn)dlsym(library, "cuMemAlloc_v2");
    cuda.mem_free = (cu_mem_free_fn)dlsym(library, "cuMemFree_v2");
    cuda.pointer_set_attribute = (cu_pointer_set_attribute_fn)dlsym(library, "cuPointerSetAttribute");
    cuda.ready = init && cuda.device_get_count && cuda.device_get && cuda.device_get_pci_bus_id && init(0) == 0;
}

int rdma_cuda_bus_ids(char *ids, int capacity) {
    pthread_once(&cuda.once, cuda_load);
    if (!cuda.ready) return -1;
    int count = 0, found = 0;
    if (cuda.device_get_count(&count) != 0) return -1;
    for (int i = 0; i < count && found < capacity; i++) {
        int device;
        char *id = ids + (size_t)found * RDMA_BUS_ID_SIZE;
        if (cuda.device_get(&device, i) != 0 || cuda.device_get_pci_bus_id(id, RDMA_BUS_ID_SIZE, device) != 0) continue;
        for (char *c = id; *c; c++) if (*c >= 'A' && *c <= 'F') *c += 'a' - 'A';
        found++;
    }
    return found;
}

int rdma_reg_dmabuf_mr(rdma_context *c, void *addr, size_t length, void **mr_out, uint32_t *lkey, uint32_t *rkey) {
    pthread_once(&cuda.once, cuda_load);
    if (!cuda.ready || !cuda.mem_get_handle_for_address_range) return -ENOSYS;
    /* The driver exports whole host pages: export the page-aligned range, register at the offset. */
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t base = (uintptr_t)addr & ~(page - 1);
    size_t span = (((uintptr_t)addr + length + page - 1) & ~(page - 1)) - base;
    int fd = -1;
    if (cuda.mem_get_handle_for_address_range(&fd, (unsigned long long)base, span, 1, 0) != 0 || fd < 0) return -EINVAL;
    errno = 0;
    struct ibv_mr *mr = ibv_reg_dmabuf_mr(c->pd, (uint64_t)((uintptr_t)addr - base), length, (uint64_t)(uintptr_t)addr, fd,
                                          IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
    int status = mr ? 0 : neg_errno(EINVAL);
    close(fd); /* the MR holds its own reference to the dma-buf */
    if (!mr) return status;
    *mr_out = mr;
    *lkey = mr->lkey;
    *rkey = mr->rkey;
    return 0;
}

/* Makes device `ordinal`'s primary context current on this thread (retained once per device). */
static int cuda_use_device(int ordinal) {
    static void *contexts[64];
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_once(&cuda.once, cuda_load);
    if (!cuda.ready || !cuda.primary_ctx_retain || !cuda.ctx_set_current || !cuda.mem_alloc || !cuda.mem_free) return -ENOSYS;
    int count = 0, device;
    if (ordinal < 0 || ordinal >= 64 || cuda.device_get_count(&count) != 0 || ordinal >= count || cuda.device_get(&device, ordinal) != 0) return -ENODEV;
    pthread_mutex_lock(&lock);
    int status = contexts[ordinal] || cuda.primary_ctx_retain(&contexts[ordinal], device) == 0 ? 0 : -ENODEV;
    void *context = contexts[ordinal];
    pthread_mutex_unlock(&lock);
    if (status != 0) return status;
    return cuda.ctx_set_current(context) == 0 ? 0 : -ENODEV;
}

int rdma_cuda_alloc(int ordinal, size_t length, void **addr) {
    int status = cuda_use_device(ordinal);
    if (status != 0) return status;
    unsigned long long pointer = 0;
    if (cuda.mem_alloc(&pointer, length) != 0) return -ENOMEM;
    unsigned int one = 1;
    if (cuda.pointer_set_attribute) (void)cuda.pointer_set_attribute(&one, 6 /* CU_POINTER_ATTRIBUTE_SYNC_MEMOPS */, pointer);
    *addr = (void *)(uintptr_t)pointer;
    return 0;
}

int rdma_cuda_free(int ordinal, void *addr) {
    if (cuda_use_device(ordinal) != 0) return -EINVAL;
    return cuda.mem_free((unsigned long long)(uintptr_t)addr) == 0 ? 0 : -EINVAL;
}
