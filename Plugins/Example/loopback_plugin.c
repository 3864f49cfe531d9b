/*
 * loopback_plugin.c - a complete transport plugin in C, written against te_transport_abi.h
 * alone: the example of Plugins/README.md ("Writing a plugin"), built and checked by the tests
 * (`transfer-engine plugins --check libtransport_loopback.so` passes).
 *
 * Protocol "loopback": processes on one host copy each other's memory with process_vm_readv /
 * process_vm_writev. Before each copy a worker thread asks the owner, over the host's
 * handshake channel, to pin the range ("loop_check"); the owner answers with its pid if the
 * range is registered, and the copy goes to that pid (a descriptor's word is never trusted for
 * it, and our own pid is refused). After the copy the worker unpins it ("loop_done"); an
 * unregister refuses new pins and waits (at most 2 s, for a peer that died mid-copy) until none
 * is left, so no copy lands in memory after its unregister returned. Two round trips per
 * request: simple and safe, not fast. Trust boundary: same-host processes of one user, which
 * the kernel already lets attach to each other here (create sets PR_SET_PTRACER_ANY).
 *
 * Build: cc -shared -fPIC -O2 -I Sources/CTransportABI/include -o libtransport_loopback.so \
 *        Plugins/Example/loopback_plugin.c -lpthread
 */
#define _GNU_SOURCE
#include "te_transport_abi.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_REGISTRATIONS 1024
#define MAX_PEERS 256
#define MAX_DONE 65536
#define MAX_QUEUED 65536
#define UNPIN_GRACE_NS 2000000000ull

typedef struct { uint64_t addr, length; uint32_t pins; int dying; } range;
typedef struct { uint64_t handle; char segment[256]; } peer;
typedef struct job { te_request request; char segment[256]; struct job *next; } job;

struct te_instance {
    const te_host_services *host;
    pthread_mutex_t lock;
    pthread_cond_t work, finished, unpinned;
    range registered[MAX_REGISTRATIONS];
    int registrations;
    peer peers[MAX_PEERS];
    int peer_count;
    uint64_t next_peer;
    job *head, *tail;
    size_t queued;
    te_completion *done;
    size_t done_count;
    int stopping;
    pthread_t worker;
};

/* last_error: one text per thread, tagged with the instance it belongs to. */
static __thread const struct te_instance *error_owner;
static __thread char error_text[256];

static int32_t fail(const struct te_instance *self, int32_t status, const char *text) {
    error_owner = self;
    snprintf(error_text, sizeof error_text, "%s", text);
    return status;
}

static int32_t put(te_buffer *out, const char *text) {
    size_t length = strlen(text);
    if (!out) return TE_OK;
    out->length = length;
    if (!out->data || out->capacity <= length) return TE_ERR_BUFFER_TOO_SMALL;
    memcpy(out->data, text, length + 1);
    return TE_OK;
}

static int boot_id(char out[64]) {
    FILE *file = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!file) return -1;
    int ok = fgets(out, 64, file) != NULL;
    fclose(file);
    if (!ok) return -1;
    out[strcspn(out, "\n")] = 0;
    return 0;
}

/* The number after "key": in text, or 0 when absent. */
static uint64_t number_after(const char *text, const char *key) {
    const char *at = strstr(text, key);
    return at ? strtoull(at + strlen(key), NULL, 10) : 0;
}

/* The live registration holding [addr, addr+length), or NULL. */
static range *holding(struct te_instance *self, uint64_t addr, uint64_t length) {
    for (int i = 0; i < self->registrations; i++) {
        range *r = &self->registered[i];
        if (!r->dying && length > 0 && addr >= r->addr && addr - r->addr <= r->length && length <= r->length - (addr - r->addr)) return r;
    }
    return NULL;
}

static int inside(struct te_instance *self, uint64_t addr, uint64_t length) { return holding(self, addr, length) != NULL; }

static int32_t probe(const char *options, te_buffer *reason, te_buffer *hint) {
    (void)options;
    char id[64];
    uint64_t source = 42, target = 0;
    struct iovec local = {&target, 8}, remote = {&source, 8};
    if (boot_id(id) != 0 || process_vm_readv(getpid(), &local, 1, &remote, 1, 0) != 8) {
        put(hint, "mount /proc and allow cross-memory attach (CONFIG_CROSS_MEMORY_ATTACH, ptrace policy)");
        put(reason, "process_vm_readv is not permitted here");
        return TE_ERR_HARDWARE_ABSENT;
    }
    int32_t a = put(reason, "same-host copies with process_vm_readv/writev");
    int32_t b = put(hint, "");
    return a == TE_OK && b == TE_OK ? TE_OK : TE_ERR_BUFFER_TOO_SMALL;
}

static void finish(struct te_instance *self, uint64_t cookie, int32_t status, uint64_t bytes) {
    pthread_mutex_lock(&self->lock);
    while (self->done_count == MAX_DONE && !self->stopping) pthread_cond_wait(&self->finished, &self->lock);
    if (self->done_count < MAX_DONE) self->done[self->done_count++] = (te_completion){cookie, status, 0, status == TE_OK ? bytes : 0};
    pthread_cond_broadcast(&self->finished);
    pthread_mutex_unlock(&self->lock);
}

/* Asks the owner to pin the range; its pid, or 0 with the status. */
static pid_t ask_owner(struct te_instance *self, const job *j, int32_t *status) {
    char request[128], answer[256];
    snprintf(request, sizeof request, "{\"loop_check\":[%" PRIu64 ",%" PRIu64 "]}", j->request.remote_addr, j->request.length);
    te_buffer reply = {answer, sizeof answer, 0};
    *status = self->host->handshake_send(self->host->host_context, j->segment, request, &reply);
    if (*status != TE_OK) return 0;
    answer[sizeof answer - 1] = 0;
    uint64_t pid = number_after(answer, "\"loop_pid\":");
    if (number_after(answer, "\"loop_ok\":") != 1 || pid == 0 || pid > 0x7fffffff) {
        *status = TE_ERR_OUT_OF_RANGE;
        return 0;
    }
    if ((pid_t)pid == getpid()) { /* a peer must not turn our copies against ourselves */
        *status = TE_ERR_REJECTED;
        return 0;
    }
    return (pid_t)pid;
}

/* Tells the owner the copy is over (its pin goes). */
static void release_owner(struct te_instance *self, const job *j) {
    char request[128], answer[64];
    snprintf(request, sizeof request, "{\"loop_done\":[%" PRIu64 ",%" PRIu64 "]}", j->request.remote_addr, j->request.length);
    te_buffer reply = {answer, sizeof answer, 0};
    (void)self->host->handshake_send(self->host->host_context, j->segment, request, &reply);
}

static void *work(void *argument) {
    struct te_instance *self = argument;
    for (;;) {
        pthread_mutex_lock(&self->lock);
        while (!self->head && !self->stopping) pthread_cond_wait(&self->work, &self->lock);
        job *j = self->head;
        if (j) { self->head = j->next; if (!self->head) self->tail = NULL; self->queued--; }
        pthread_mutex_unlock(&self->lock);
        if (!j) return NULL;
        int32_t status;
        pid_t owner = ask_owner(self, j, &status);
        uint64_t moved = 0;
        while (owner && moved < j->request.length) {
            struct iovec local = {(void *)(uintptr_t)(j->request.local_addr + moved), j->request.length - moved};
            struct iovec remote = {(void *)(uintptr_t)(j->request.remote_addr + moved), j->request.length - moved};
            ssize_t n = j->request.opcode == TE_OP_WRITE ? process_vm_writev(owner, &local, 1, &remote, 1, 0)
                                                         : process_vm_readv(owner, &local, 1, &remote, 1, 0);
            if (n <= 0) { status = errno == ESRCH ? TE_ERR_PEER_UNREACHABLE : TE_ERR_IO; break; }
            moved += (uint64_t)n;
        }
        if (owner) release_owner(self, j);
        finish(self, j->request.cookie, owner && moved == j->request.length ? TE_OK : status, moved);
        free(j);
    }
}

static int32_t create(const char *options, const te_host_services *host, te_instance **out) {
    (void)options;
    if (!out || !host || host->struct_size < sizeof(te_host_services) || !host->handshake_send) return TE_ERR_INVALID_ARGUMENT;
    struct te_instance *self = calloc(1, sizeof *self);
    if (!self || !(self->done = calloc(MAX_DONE, sizeof(te_completion)))) { free(self); return TE_ERR_NO_RESOURCES; }
    self->host = host;
    self->next_peer = 1;
    pthread_mutex_init(&self->lock, NULL);
    pthread_condattr_t attributes;
    pthread_condattr_init(&attributes);
    pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC);
    pthread_cond_init(&self->work, &attributes);
    pthread_cond_init(&self->finished, &attributes);
    pthread_cond_init(&self->unpinned, &attributes);
    pthread_condattr_destroy(&attributes);
    /* Let peers of this user attach where Yama limits ptrace to descendants. */
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
    if (pthread_create(&self->worker, NULL, work, self) != 0) { free(self->done); free(self); return TE_ERR_NO_RESOURCES; }
    *out = self;
    return TE_OK;
}

static void destroy(te_instance *self) {
    if (!self) return;
    pthread_mutex_lock(&self->lock);
    self->stopping = 1;
    pthread_cond_broadcast(&self->work);
    pthread_cond_broadcast(&self->finished);
    pthread_mutex_unlock(&self->lock);
    pthread_join(self->worker, NULL); /* no call into the host after destroy returns */
    for (job *j = self->head, *next; j; j = next) { next = j->next; free(j); }
    free(self->done);
    free(self);
}

static int32_t local_descriptor(te_instance *self, te_buffer *out) {
    char id[64], text[160];
    if (boot_id(id) != 0) return fail(self, TE_ERR_INTERNAL, "cannot read the boot id");
    snprintf(text, sizeof text, "{\"loopback_boot_id\":\"%s\",\"loopback_pid\":%d}", id, (int)getpid());
    return put(out, text);
}

static int32_t register_memory(te_instance *self, uint64_t addr, uint64_t length, const char *location, te_buffer *out) {
    (void)location;
    if (length == 0 || addr > UINT64_MAX - length) return fail(self, TE_ERR_INVALID_ARGUMENT, "empty or wrapping range");
    if (out && out->capacity < 3) { out->length = 2; return TE_ERR_BUFFER_TOO_SMALL; } /* answer first: nothing to undo */
    pthread_mutex_lock(&self->lock);
    int full = self->registrations == MAX_REGISTRATIONS;
    if (!full) self->registered[self->registrations++] = (range){addr, length, 0, 0};
    pthread_mutex_unlock(&self->lock);
    if (full) return fail(self, TE_ERR_NO_RESOURCES, "too many registrations");
    return put(out, "{}");
}

/* No new pins from now on; copies that hold one are waited for (2 s at most: a dead peer never unpins). */
static int32_t unregister_memory(te_instance *self, uint64_t addr) {
    pthread_mutex_lock(&self->lock);
    range *r = NULL;
    for (int i = 0; i < self->registrations && !r; i++) if (self->registered[i].addr == addr && !self->registered[i].dying) r = &self->registered[i];
    if (!r) {
        pthread_mutex_unlock(&self->lock);
        return fail(self, TE_ERR_INVALID_ARGUMENT, "no registration starts there");
    }
    r->dying = 1;
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += UNPIN_GRACE_NS / 1000000000u;
    /* Entries move while the lock is released (others come and go): look this one up by its mark each time. */
    for (;;) {
        const range *mine = NULL;
        for (int i = 0; i < self->registrations && !mine; i++) if (self->registered[i].addr == addr && self->registered[i].dying) mine = &self->registered[i];
        if (!mine || mine->pins == 0 || pthread_cond_timedwait(&self->unpinned, &self->lock, &deadline) == ETIMEDOUT) break;
    }
    for (int i = 0; i < self->registrations; i++) {
        if (self->registered[i].addr == addr && self->registered[i].dying) { self->registered[i] = self->registered[--self->registrations]; break; }
    }
    pthread_mutex_unlock(&self->lock);
    return TE_OK;
}

static int32_t open_peer(te_instance *self, const char *segment, const char *descriptor, uint64_t *handle) {
    char id[64];
    if (!segment || !descriptor || !handle || strlen(segment) >= 256) return fail(self, TE_ERR_INVALID_ARGUMENT, "bad open_peer arguments");
    const char *at = strstr(descriptor, "\"loopback_boot_id\":\"");
    if (boot_id(id) != 0 || !at || strncmp(at + 20, id, strlen(id)) != 0 || at[20 + strlen(id)] != '"')
        return fail(self, TE_ERR_PEER_UNREACHABLE, "the peer is not a loopback engine on this host");
    pthread_mutex_lock(&self->lock);
    int full = self->peer_count == MAX_PEERS;
    if (!full) {
        peer *p = &self->peers[self->peer_count++];
        p->handle = self->next_peer++;
        snprintf(p->segment, sizeof p->segment, "%s", segment);
        *handle = p->handle;
    }
    pthread_mutex_unlock(&self->lock);
    return full ? fail(self, TE_ERR_NO_RESOURCES, "too many peers") : TE_OK;
}

static void close_peer(te_instance *self, uint64_t handle) {
    pthread_mutex_lock(&self->lock);
    for (int i = 0; i < self->peer_count; i++) {
        if (self->peers[i].handle == handle) { self->peers[i] = self->peers[--self->peer_count]; break; }
    }
    pthread_mutex_unlock(&self->lock);
}

/* The owner's side: pin [addr, addr+length) if it is registered here ("loop_check"), or unpin it ("loop_done"). */
static int32_t on_handshake(te_instance *self, const char *request, te_buffer *reply) {
    if (!request) return fail(self, TE_ERR_INVALID_ARGUMENT, "no request");
    const char *check = strstr(request, "\"loop_check\":["), *done = strstr(request, "\"loop_done\":[");
    const char *at = check ? check + 14 : done ? done + 13 : NULL;
    if (!at) return put(reply, "{\"reply_msg\":\"\"}");
    char *end;
    uint64_t addr = strtoull(at, &end, 10);
    uint64_t length = *end == ',' ? strtoull(end + 1, NULL, 10) : 0;
    pthread_mutex_lock(&self->lock);
    int ok = 0;
    if (check) {
        range *r = holding(self, addr, length);
        if (r && r->pins < UINT32_MAX) { r->pins++; ok = 1; }
    } else {
        /* Pinned ranges are found even while dying: the unregister waits for exactly these. */
        for (int i = 0; i < self->registrations; i++) {
            range *r = &self->registered[i];
            if (r->pins > 0 && length > 0 && addr >= r->addr && addr - r->addr <= r->length && length <= r->length - (addr - r->addr)) {
                r->pins--;
                pthread_cond_broadcast(&self->unpinned);
                break;
            }
        }
    }
    pthread_mutex_unlock(&self->lock);
    if (done) return put(reply, "{\"reply_msg\":\"\"}");
    char text[80];
    snprintf(text, sizeof text, "{\"loop_ok\":%d,\"loop_pid\":%d}", ok, (int)getpid());
    int32_t status = put(reply, text);
    if (status != TE_OK && ok) { /* the host retries with a larger buffer: that retry pins again */
        pthread_mutex_lock(&self->lock);
        range *r = holding(self, addr, length);
        if (r && r->pins > 0) { r->pins--; pthread_cond_broadcast(&self->unpinned); }
        pthread_mutex_unlock(&self->lock);
    }
    return status;
}

static int32_t submit(te_instance *self, const te_request *requests, size_t count, size_t stride, size_t *accepted) {
    if (!accepted || (count && !requests) || stride < sizeof(te_request)) return fail(self, TE_ERR_INVALID_ARGUMENT, "bad submit arguments");
    *accepted = 0;
    int32_t status = TE_OK;
    pthread_mutex_lock(&self->lock);
    for (size_t i = 0; i < count; i++) {
        te_request r;
        memcpy(&r, (const char *)requests + i * stride, sizeof r);
        const peer *p = NULL;
        for (int k = 0; k < self->peer_count; k++) if (self->peers[k].handle == r.peer) p = &self->peers[k];
        if (!p) { status = fail(self, TE_ERR_INVALID_ARGUMENT, "unknown peer handle"); break; }
        if (r.length == 0 || (r.opcode != TE_OP_READ && r.opcode != TE_OP_WRITE)) { status = fail(self, TE_ERR_INVALID_ARGUMENT, "bad request"); break; }
        if (!inside(self, r.local_addr, r.length)) { status = fail(self, TE_ERR_OUT_OF_RANGE, "local range is not registered"); break; }
        if (self->queued >= MAX_QUEUED) { status = fail(self, TE_ERR_AGAIN, "the queue is full: poll, then submit the rest"); break; }
        job *j = malloc(sizeof *j);
        if (!j) { status = fail(self, TE_ERR_NO_RESOURCES, "out of memory"); break; }
        j->request = r;
        memcpy(j->segment, p->segment, sizeof j->segment);
        j->next = NULL;
        if (self->tail) self->tail->next = j; else self->head = j;
        self->tail = j;
        self->queued++;
        *accepted = i + 1;
    }
    pthread_cond_signal(&self->work);
    pthread_mutex_unlock(&self->lock);
    return status;
}

static int32_t poll_completions(te_instance *self, te_completion *out, size_t capacity, size_t stride, uint64_t timeout_ns, size_t *count) {
    if (!count || (capacity && !out) || stride < sizeof(te_completion)) return fail(self, TE_ERR_INVALID_ARGUMENT, "bad poll arguments");
    pthread_mutex_lock(&self->lock);
    if (self->done_count == 0 && timeout_ns > 0) {
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        uint64_t total = (uint64_t)deadline.tv_nsec + (timeout_ns < 60000000000ull ? timeout_ns : 60000000000ull);
        deadline.tv_sec += (time_t)(total / 1000000000u);
        deadline.tv_nsec = (long)(total % 1000000000u);
        pthread_cond_timedwait(&self->finished, &self->lock, &deadline);
    }
    size_t n = self->done_count < capacity ? self->done_count : capacity;
    for (size_t i = 0; i < n; i++) memcpy((char *)out + i * stride, &self->done[i], sizeof(te_completion));
    memmove(self->done, self->done + n, (self->done_count - n) * sizeof(te_completion));
    self->done_count -= n;
    if (n) pthread_cond_broadcast(&self->finished);
    pthread_mutex_unlock(&self->lock);
    *count = n;
    return TE_OK;
}

static const char *last_error(te_instance *self) { return error_owner == self ? error_text : ""; }

static const te_plugin_descriptor descriptor = {
    .abi_major = TE_ABI_MAJOR, .abi_minor = TE_ABI_MINOR, .struct_size = sizeof(te_plugin_descriptor),
    .name = "loopback", .version = "1.0.0", .protocols = "loopback",
    .capabilities = TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE | TE_CAP_SPLITS_REQUESTS,
    .probe = probe, .create = create, .destroy = destroy, .local_descriptor = local_descriptor,
    .register_memory = register_memory, .unregister_memory = unregister_memory, .open_peer = open_peer,
    .close_peer = close_peer, .on_handshake = on_handshake, .submit = submit, .poll = poll_completions,
    .last_error = last_error,
};

__attribute__((visibility("default"))) const te_plugin_descriptor *te_transport_plugin_entry(void) { return &descriptor; }
