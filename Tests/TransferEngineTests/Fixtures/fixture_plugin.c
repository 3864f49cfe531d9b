/*
 * Test fixture plugins for the transport ABI, compiled by the tests with cc.
 * One source, several variants selected with -D:
 *   (default)            a complete plugin for protocol FIXTURE_PROTOCOL that
 *                        moves bytes with memcpy between engines of ONE process
 *                        (peers are matched by pid from the descriptor fragment)
 *   FIXTURE_ABSENT       probe answers TE_ERR_HARDWARE_ABSENT
 *   FIXTURE_BAD_MAJOR    abi_major = 99
 *   FIXTURE_SMALL        struct_size shorter than the v1 minimum (an "older" layout)
 *   FIXTURE_NEWER        a larger descriptor with an appended field (newer minor)
 *   FIXTURE_NO_ENTRY     the entry symbol is not exported
 *   FIXTURE_NEEDS_LIB    links a library the test deletes afterwards
 *   FIXTURE_V10_GUARDED  an ABI 1.0-sized descriptor (no allocate/free entries) placed at
 *                        the very end of a mapped page whose next page is PROT_NONE:
 *                        a host that reads past struct_size faults
 * Fault switches (any variant), checked at each submit: while the file named by the
 * option MC_FIXTURE_FAULT_FILE exists, every request completes with TE_ERR_IO and
 * moves nothing; while MC_FIXTURE_STALL_FILE exists, requests are accepted and never
 * complete.
 *   FIXTURE_HANDOFF      a completion is hidden from the thread that submitted it for
 *                        20 ms: another thread's poll reaps it first (cross-thread hand-over)
 */
#include "te_transport_abi.h"
#include <pthread.h>
#include <stddef.h>
#include <sys/mman.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef FIXTURE_PROTOCOL
#define FIXTURE_PROTOCOL "loopcopy"
#endif

#ifdef FIXTURE_NEEDS_LIB
extern int fixture_dependency_function(void);
int fixture_use_dependency(void) { return fixture_dependency_function(); }
#endif

#define MAX_DONE 4096

struct te_instance {
    pthread_mutex_t lock;
    te_completion done[MAX_DONE];
    /* FIXTURE_HANDOFF: who submitted each completion, and when (ns). */
    pthread_t submitter[MAX_DONE];
    uint64_t submitted_ns[MAX_DONE];
    uint64_t length[MAX_DONE]; /* each queued completion's request length (in flight until polled) */
    size_t done_count;
    /* What `stats` reports for the one device, "fixture0". */
    uint64_t bytes_read, bytes_written, inflight_bytes, errors;
    const te_host_services *host;
    char last_error[256];
    char fault_file[512];
    char stall_file[512];
    int destroyed;
};

/* The ABI says no call follows destroy: the instance is kept (leaked) with a mark, and any
 * call that reaches it afterwards aborts the process, so a host that breaks the rule fails. */
#define LIVE(i) do { if ((i) && (i)->destroyed) { fprintf(stderr, "fixture: %s called after destroy\n", __func__); abort(); } } while (0)

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int32_t put(te_buffer *out, const char *text) {
    size_t n = strlen(text);
    if (!out) return TE_OK;
    out->length = n;
    if (!out->data || out->capacity <= n) return TE_ERR_BUFFER_TOO_SMALL;
    memcpy(out->data, text, n + 1);
    return TE_OK;
}

static int switch_on(const char *path) {
    return path[0] && access(path, F_OK) == 0;
}

/* Copies the string value of "key" in the options JSON (no escapes expected) into out. */
static void option(const char *options, const char *key, char *out, size_t size) {
    char needle[128];
    snprintf(needle, sizeof needle, "\"%s\":\"", key);
    const char *at = options ? strstr(options, needle) : NULL;
    out[0] = 0;
    if (!at) return;
    at += strlen(needle);
    size_t n = 0;
    while (at[n] && at[n] != '"' && n + 1 < size) { out[n] = at[n]; n++; }
    out[n] = 0;
}

static int32_t fx_probe(const char *options, te_buffer *reason, te_buffer *hint) {
    (void)options;
#ifdef FIXTURE_ABSENT
    put(reason, "no fixture device found (0 devices)");
    put(hint, "attach a fixture device");
    return TE_ERR_HARDWARE_ABSENT;
#else
    put(reason, "fixture ready");
    put(hint, "");
    return TE_OK;
#endif
}

static int32_t fx_create(const char *options, const te_host_services *host, te_instance **out) {
    te_instance *i = calloc(1, sizeof *i);
    if (!i) return TE_ERR_NO_RESOURCES;
    option(options, "MC_FIXTURE_FAULT_FILE", i->fault_file, sizeof i->fault_file);
    option(options, "MC_FIXTURE_STALL_FILE", i->stall_file, sizeof i->stall_file);
    pthread_mutex_init(&i->lock, NULL);
    i->host = host;
    if (host && host->log) host->log(host->host_context, TE_LOG_INFO, "fixture plugin instance created");
    *out = i;
    return TE_OK;
}

static void fx_destroy(te_instance *i) { LIVE(i); i->destroyed = 1; }

static int32_t fx_local_descriptor(te_instance *i, te_buffer *out) {
    LIVE(i);
    (void)i;
    char text[64];
    snprintf(text, sizeof text, "{\"fixture_pid\":%ld}", (long)getpid());
    return put(out, text);
}

static int32_t fx_register(te_instance *i, uint64_t addr, uint64_t len, const char *loc, te_buffer *out) {
    LIVE(i);
    (void)i; (void)addr; (void)len; (void)loc;
    return put(out, "{\"fixture_key\":[7]}");
}

static int32_t fx_unregister(te_instance *i, uint64_t addr) { LIVE(i); (void)addr; return TE_OK; }

static int32_t fx_open_peer(te_instance *i, const char *segment, const char *descriptor, uint64_t *peer) {
    LIVE(i);
    (void)segment;
    char needle[64];
    snprintf(needle, sizeof needle, "\"fixture_pid\":%ld", (long)getpid());
    if (!strstr(descriptor, needle)) {
        snprintf(i->last_error, sizeof i->last_error, "peer is not in this process");
        return TE_ERR_PEER_UNREACHABLE;
    }
    *peer = 1;
    return TE_OK;
}

static void fx_close_peer(te_instance *i, uint64_t peer) { LIVE(i); (void)peer; }

static int32_t fx_on_handshake(te_instance *i, const char *request, te_buffer *reply) {
    LIVE(i);
    (void)i; (void)request;
    return put(reply, "{\"reply_msg\":\"\"}");
}

static int32_t fx_submit(te_instance *i, const te_request *reqs, size_t count, size_t stride, size_t *accepted) {
    LIVE(i);
    if (switch_on(i->stall_file)) { *accepted = count; return TE_OK; }
    int fault = switch_on(i->fault_file);
    pthread_mutex_lock(&i->lock);
    size_t n = 0;
    for (; n < count && i->done_count < MAX_DONE; n++) {
        const te_request *r = (const te_request *)((const char *)reqs + n * stride);
        if (fault) {
            te_completion c = { r->cookie, TE_ERR_IO, 0, 0 };
            i->submitter[i->done_count] = pthread_self();
            i->submitted_ns[i->done_count] = now_ns();
            i->length[i->done_count] = r->length;
            i->inflight_bytes += r->length;
            i->errors++;
            i->done[i->done_count++] = c;
            continue;
        }
        if (r->opcode == TE_OP_WRITE) memcpy((void *)(uintptr_t)r->remote_addr, (void *)(uintptr_t)r->local_addr, r->length);
        else memcpy((void *)(uintptr_t)r->local_addr, (void *)(uintptr_t)r->remote_addr, r->length);
        te_completion c = { r->cookie, TE_OK, 0, r->length };
        if (r->opcode == TE_OP_WRITE) i->bytes_written += r->length; else i->bytes_read += r->length;
        i->submitter[i->done_count] = pthread_self();
        i->submitted_ns[i->done_count] = now_ns();
        i->length[i->done_count] = r->length;
        i->inflight_bytes += r->length;
        i->done[i->done_count++] = c;
    }
    pthread_mutex_unlock(&i->lock);
    *accepted = n;
    return n < count ? TE_ERR_AGAIN : TE_OK;
}

static int32_t fx_poll(te_instance *i, te_completion *out, size_t capacity, size_t stride, uint64_t timeout_ns, size_t *count) {
    LIVE(i);
    pthread_mutex_lock(&i->lock);
    size_t n = 0, kept = 0;
    for (size_t k = 0; k < i->done_count; k++) {
        int visible = n < capacity;
#ifdef FIXTURE_HANDOFF
        if (pthread_equal(i->submitter[k], pthread_self()) && now_ns() - i->submitted_ns[k] < 20000000) visible = 0;
#endif
        if (visible) {
            *(te_completion *)((char *)out + n++ * stride) = i->done[k];
            i->inflight_bytes -= i->length[k];
        } else {
            i->done[kept] = i->done[k];
            i->submitter[kept] = i->submitter[k];
            i->length[kept] = i->length[k];
            i->submitted_ns[kept++] = i->submitted_ns[k];
        }
    }
    i->done_count = kept;
    pthread_mutex_unlock(&i->lock);
    *count = n;
    if (n == 0 && timeout_ns) usleep(200);
    return TE_OK;
}

static const char *fx_last_error(te_instance *i) { LIVE(i); return i ? i->last_error : ""; }

static int32_t fx_stats(te_instance *i, te_buffer *out) {
    LIVE(i);
    char text[256];
    pthread_mutex_lock(&i->lock);
    snprintf(text, sizeof text, "{\"devices\":[{\"name\":\"fixture0\",\"bytes_read\":%llu,\"bytes_written\":%llu,\"inflight_bytes\":%llu,\"errors\":%llu}]}",
             (unsigned long long)i->bytes_read, (unsigned long long)i->bytes_written, (unsigned long long)i->inflight_bytes,
             (unsigned long long)i->errors);
    pthread_mutex_unlock(&i->lock);
    return put(out, text);
}

#ifdef FIXTURE_NEWER
typedef struct { te_plugin_descriptor v1; uint64_t appended_field; } newer_descriptor;
static newer_descriptor descriptor = {{
#else
static te_plugin_descriptor descriptor = {
#endif
#ifdef FIXTURE_BAD_MAJOR
    .abi_major = 99,
#else
    .abi_major = TE_ABI_MAJOR,
#endif
#ifdef FIXTURE_NEWER
    .abi_minor = TE_ABI_MINOR + 1,
    .struct_size = sizeof(newer_descriptor),
#elif defined(FIXTURE_SMALL)
    .abi_minor = 0,
    .struct_size = offsetof(te_plugin_descriptor, submit),
#else
    .abi_minor = TE_ABI_MINOR,
    .struct_size = sizeof(te_plugin_descriptor),
#endif
    .name = "fixture",
    .version = "9.9.9",
    .protocols = FIXTURE_PROTOCOL,
    .capabilities = TE_CAP_MEM_HOST | TE_CAP_OP_READ | TE_CAP_OP_WRITE,
    .probe = fx_probe,
    .create = fx_create,
    .destroy = fx_destroy,
    .local_descriptor = fx_local_descriptor,
    .register_memory = fx_register,
    .unregister_memory = fx_unregister,
    .open_peer = fx_open_peer,
    .close_peer = fx_close_peer,
    .on_handshake = fx_on_handshake,
    .submit = fx_submit,
    .poll = fx_poll,
    .last_error = fx_last_error,
    .stats = fx_stats,
#ifdef FIXTURE_NEWER
}, 42};
#define DESCRIPTOR (&descriptor.v1)
#else
};
#define DESCRIPTOR (&descriptor)
#endif

#if defined(FIXTURE_V10_GUARDED)
__attribute__((visibility("default"))) const te_plugin_descriptor *te_transport_plugin_entry(void) {
    static const te_plugin_descriptor *placed;
    static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&once);
    if (!placed) {
        long page = sysconf(_SC_PAGESIZE);
        char *pages = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (pages != MAP_FAILED && mprotect(pages + page, page, PROT_NONE) == 0) {
            size_t size = TE_PLUGIN_DESCRIPTOR_V1_SIZE;
            char *at = pages + page - size;
            memcpy(at, DESCRIPTOR, size);
            ((te_plugin_descriptor *)at)->abi_minor = 0;
            ((te_plugin_descriptor *)at)->struct_size = (uint32_t)size;
            placed = (const te_plugin_descriptor *)at;
        }
    }
    pthread_mutex_unlock(&once);
    return placed;
}
#elif !defined(FIXTURE_NO_ENTRY)
__attribute__((visibility("default"))) const te_plugin_descriptor *te_transport_plugin_entry(void) { return DESCRIPTOR; }
#else
__attribute__((visibility("default"))) const te_plugin_descriptor *some_other_symbol(void) { return DESCRIPTOR; }
#endif
