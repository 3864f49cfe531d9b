#define _GNU_SOURCE
#include "efa_shim.h"
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

_Static_assert(EFA_MR_LOCAL == FI_MR_LOCAL, "mr_mode mirror");
_Static_assert(EFA_MR_VIRT_ADDR == FI_MR_VIRT_ADDR, "mr_mode mirror");
_Static_assert(EFA_MR_ALLOCATED == FI_MR_ALLOCATED, "mr_mode mirror");
_Static_assert(EFA_MR_PROV_KEY == FI_MR_PROV_KEY, "mr_mode mirror");
_Static_assert(EFA_MR_ENDPOINT == FI_MR_ENDPOINT, "mr_mode mirror");
_Static_assert(EFA_MR_HMEM == FI_MR_HMEM, "mr_mode mirror");
_Static_assert(sizeof(struct fi_context2) <= 64, "op context slot size");

#define EFA_API_VERSION FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION)

struct efa_context {
    struct fi_info *info;
    struct fid_fabric *fabric;
    struct fid_domain *domain;
    struct fid_av *av;
    struct fid_cq *cq;
    struct fid_ep *ep;
    efa_domain_info summary;
    int wait_fd;   /* the CQ's wait fd, -1 when it has none */
    int wake_fd;   /* eventfd for efa_wake */
    _Atomic int plain_writes;  /* the provider refused FI_DELIVERY_COMPLETE: post fi_write */
};

int efa_err_again(void) { return -FI_EAGAIN; }
int efa_err_nodata(void) { return -FI_ENODATA; }

const char *efa_library_version(void) {
    static char text[32];
    uint32_t v = fi_version();
    snprintf(text, sizeof text, "%u.%u", FI_MAJOR(v), FI_MINOR(v));
    return text;
}

const char *efa_strerror(int code) { return fi_strerror(code < 0 ? -code : code); }

/* Offer the memory-registration bits real EFA demands; a provider answers with
 * the subset it will use, and the plugin follows that answer. */
static struct fi_info *hints_for(const char *provider, const char *domain) {
    struct fi_info *hints = fi_allocinfo();
    if (!hints) return NULL;
    hints->ep_attr->type = FI_EP_RDM;
    hints->caps = FI_MSG | FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY | FI_MR_ENDPOINT;
    hints->domain_attr->threading = FI_THREAD_DOMAIN;
    hints->fabric_attr->prov_name = strdup(provider);
    if (domain && *domain) hints->domain_attr->name = strdup(domain);
    return hints;
}

static int getinfo(const char *provider, const char *node, const char *domain, struct fi_info **out) {
    struct fi_info *hints = hints_for(provider, domain);
    if (!hints) return -FI_ENOMEM;
    int has_node = node && *node;
    int r = fi_getinfo(EFA_API_VERSION, has_node ? node : NULL, NULL, has_node ? FI_SOURCE : 0, hints, out);
    fi_freeinfo(hints);
    return r;
}

static void summarise(const struct fi_info *info, efa_domain_info *out) {
    memset(out, 0, sizeof *out);
    snprintf(out->provider, sizeof out->provider, "%s", info->fabric_attr->prov_name ? info->fabric_attr->prov_name : "");
    snprintf(out->fabric, sizeof out->fabric, "%s", info->fabric_attr->name ? info->fabric_attr->name : "");
    snprintf(out->domain, sizeof out->domain, "%s", info->domain_attr->name ? info->domain_attr->name : "");
    out->mr_mode = info->domain_attr->mr_mode;
    out->max_msg_size = info->ep_attr->max_msg_size;
    out->tx_size = info->tx_attr->size;
    out->inject_size = info->tx_attr->inject_size;
}

int efa_list_domains(const char *provider, const char *node, efa_domain_info *out, size_t capacity) {
    struct fi_info *list = NULL;
    int r = getinfo(provider, node, NULL, &list);
    if (r) return r;
    int count = 0;
    for (struct fi_info *i = list; i; i = i->next) {
        /* One entry per domain: a provider may list a domain once per address format. */
        int seen = 0;
        for (int k = 0; k < count && (size_t)k < capacity; k++)
            if (!strcmp(out[k].domain, i->domain_attr->name ? i->domain_attr->name : "")) seen = 1;
        if (seen) continue;
        if ((size_t)count < capacity) summarise(i, &out[count]);
        count++;
    }
    fi_freeinfo(list);
    return count;
}

static int fail(efa_context *c, char *err, size_t err_len, const char *what, int r) {
    snprintf(err, err_len, "%s: %s (%d)", what, fi_strerror(-r), r);
    efa_close(c);
    return r;
}

int efa_open(const char *provider, const char *node, const char *domain, efa_context **out, char *err, size_t err_len) {
    efa_context *c = calloc(1, sizeof *c);
    if (!c) return -FI_ENOMEM;
    c->wait_fd = -1;
    c->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    int r = getinfo(provider, node, domain, &c->info);
    if (r) return fail(c, err, err_len, "fi_getinfo", r);
    summarise(c->info, &c->summary);
    /* Delivery completion only where a plain write's completion means "sent": the socket-based
     * providers (tcp;ofi_rxm, sockets, udp). EFA's device writes complete on the peer's
     * acknowledgement (upstream posts plain fi_write there). libfabric's shm provider delivers a
     * small write only when the target's progress runs, and a passive target's progress thread
     * sleeps on a CQ that incoming RMA never signals: asking for delivery there stalled each
     * 4 KiB write until that thread woke (GB/s fell to MB/s). See the plugin README. */
    const char *p = c->summary.provider;
    if (!strstr(p, "tcp") && !strstr(p, "sockets") && !strstr(p, "udp")) c->plain_writes = 1;
    if ((r = fi_fabric(c->info->fabric_attr, &c->fabric, NULL))) return fail(c, err, err_len, "fi_fabric", r);
    if ((r = fi_domain(c->fabric, c->info, &c->domain, NULL))) return fail(c, err, err_len, "fi_domain", r);
    struct fi_av_attr av = { .type = FI_AV_TABLE };
    if ((r = fi_av_open(c->domain, &av, &c->av, NULL))) return fail(c, err, err_len, "fi_av_open", r);
    size_t depth = c->info->tx_attr->size * 2 + c->info->rx_attr->size;
    if (depth < 1024) depth = 1024;
    /* A CQ with a wait fd lets an idle progress thread sleep; not every provider has one. */
    struct fi_cq_attr cq = { .format = FI_CQ_FORMAT_CONTEXT, .size = depth, .wait_obj = FI_WAIT_FD };
    if (fi_cq_open(c->domain, &cq, &c->cq, NULL) == 0) {
        if (fi_control(&c->cq->fid, FI_GETWAIT, &c->wait_fd) != 0) c->wait_fd = -1;
    } else {
        cq.wait_obj = FI_WAIT_NONE;
        if ((r = fi_cq_open(c->domain, &cq, &c->cq, NULL))) return fail(c, err, err_len, "fi_cq_open", r);
    }
    if ((r = fi_endpoint(c->domain, c->info, &c->ep, NULL))) return fail(c, err, err_len, "fi_endpoint", r);
    if ((r = fi_ep_bind(c->ep, &c->av->fid, 0))) return fail(c, err, err_len, "fi_ep_bind(av)", r);
    if ((r = fi_ep_bind(c->ep, &c->cq->fid, FI_TRANSMIT | FI_RECV))) return fail(c, err, err_len, "fi_ep_bind(cq)", r);
    if ((r = fi_enable(c->ep))) return fail(c, err, err_len, "fi_enable", r);
    *out = c;
    return 0;
}

void efa_close(efa_context *c) {
    if (!c) return;
    if (c->ep) fi_close(&c->ep->fid);
    if (c->cq) fi_close(&c->cq->fid);
    if (c->av) fi_close(&c->av->fid);
    if (c->domain) fi_close(&c->domain->fid);
    if (c->fabric) fi_close(&c->fabric->fid);
    if (c->info) fi_freeinfo(c->info);
    if (c->wake_fd >= 0) close(c->wake_fd);
    free(c);
}

const efa_domain_info *efa_info(const efa_context *c) { return &c->summary; }

int efa_get_name(efa_context *c, uint8_t *out, size_t *length) { return fi_getname(&c->ep->fid, out, length); }

int efa_mr_reg(efa_context *c, void *addr, size_t length, uint64_t requested_key, void **mr_out, uint64_t *key, void **desc) {
    struct fid_mr *mr = NULL;
    uint64_t access = FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;
    uint64_t wanted = (c->summary.mr_mode & FI_MR_PROV_KEY) ? 0 : requested_key;
    int r = fi_mr_reg(c->domain, addr, length, access, 0, wanted, 0, &mr, NULL);
    if (r) return r;
    if (c->summary.mr_mode & FI_MR_ENDPOINT) {
        if ((r = fi_mr_bind(mr, &c->ep->fid, 0)) || (r = fi_mr_enable(mr))) { fi_close(&mr->fid); return r; }
    }
    *mr_out = mr;
    *key = fi_mr_key(mr);
    *desc = fi_mr_desc(mr);
    return 0;
}

int efa_mr_close(void *mr) { return mr ? fi_close(&((struct fid_mr *)mr)->fid) : 0; }

int efa_av_insert(efa_context *c, const uint8_t *addr, size_t length, uint64_t *fi_addr) {
    /* The address comes from a peer: fi_av_insert reads the provider's address length from it,
     * so anything shorter (or longer) is refused before libfabric touches it. */
    size_t expected = 0;
    fi_getname(&c->ep->fid, NULL, &expected);
    if (expected == 0 || length != expected) return -FI_EINVAL;
    fi_addr_t handle = FI_ADDR_UNSPEC;
    int n = fi_av_insert(c->av, addr, 1, &handle, 0, NULL);
    if (n != 1) return n < 0 ? n : -FI_EINVAL;
    *fi_addr = handle;
    return 0;
}

int efa_av_remove(efa_context *c, uint64_t fi_addr) {
    fi_addr_t handle = fi_addr;
    return fi_av_remove(c->av, &handle, 1, 0);
}

/* A write completes only once its bytes are in the target's memory (FI_DELIVERY_COMPLETE): the
 * default completion level of some providers (tcp;ofi_rxm) is "sent", so a caller told "done"
 * could read the target before the bytes land there. A provider (or peer) that cannot deliver
 * that level answers -FI_EOPNOTSUPP; the context then posts plain writes from then on. */
ssize_t efa_post(efa_context *c, int is_write, void *local, size_t length, void *desc, uint64_t peer,
                 uint64_t remote_addr, uint64_t key, void *op_context) {
    if (!is_write) return fi_read(c->ep, local, length, desc, peer, remote_addr, key, op_context);
    if (!c->plain_writes) {
        struct iovec iov = { .iov_base = local, .iov_len = length };
        struct fi_rma_iov rma = { .addr = remote_addr, .len = length, .key = key };
        struct fi_msg_rma msg = { .msg_iov = &iov, .desc = &desc, .iov_count = 1, .addr = peer,
                                  .rma_iov = &rma, .rma_iov_count = 1, .context = op_context, .data = 0 };
        ssize_t r = fi_writemsg(c->ep, &msg, FI_COMPLETION | FI_DELIVERY_COMPLETE);
        if (r != -FI_EOPNOTSUPP) return r;
        c->plain_writes = 1;
    }
    return fi_write(c->ep, local, length, desc, peer, remote_addr, key, op_context);
}

ssize_t efa_cq_read(efa_context *c, void **op_contexts, size_t capacity, efa_failure *failure) {
    struct fi_cq_entry entries[64];
    if (capacity > 64) capacity = 64;
    ssize_t n = fi_cq_read(c->cq, entries, capacity);
    if (n > 0) {
        for (ssize_t i = 0; i < n; i++) op_contexts[i] = entries[i].op_context;
        return n;
    }
    if (n == -FI_EAGAIN) return 0;
    if (n == -FI_EAVAIL) {
        struct fi_cq_err_entry e;
        memset(&e, 0, sizeof e);
        if (fi_cq_readerr(c->cq, &e, 0) != 1) return -FI_EOTHER;
        failure->op_context = e.op_context;
        failure->error = e.err;
        failure->prov_errno = e.prov_errno;
        const char *detail = fi_cq_strerror(c->cq, e.prov_errno, e.err_data, NULL, 0);
        snprintf(failure->text, sizeof failure->text, "%s%s%s", fi_strerror(e.err), detail ? ": " : "", detail ? detail : "");
        return -1;
    }
    return n;
}

int efa_can_wait(const efa_context *c) { return c->wait_fd >= 0; }

int efa_try_wait(efa_context *c) {
    if (c->wait_fd < 0) return 1;
    struct fid *fids[1] = { &c->cq->fid };
    return fi_trywait(c->fabric, fids, 1) == FI_SUCCESS;
}

int efa_sleep(efa_context *c, int timeout_ms) {
    struct pollfd fds[2] = { { .fd = c->wake_fd, .events = POLLIN }, { .fd = c->wait_fd, .events = POLLIN } };
    int r = poll(fds, c->wait_fd >= 0 ? 2 : 1, timeout_ms);
    if (r < 0 && errno != EINTR) return -errno;
    if (r > 0 && (fds[0].revents & POLLIN)) {
        uint64_t value;
        ssize_t ignored = read(c->wake_fd, &value, sizeof value);
        (void)ignored;
    }
    return 0;
}

void efa_wake(efa_context *c) {
    uint64_t one = 1;
    ssize_t ignored = write(c->wake_fd, &one, sizeof one);
    (void)ignored;
}
