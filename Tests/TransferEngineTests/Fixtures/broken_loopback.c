/*
 * broken_loopback.c - the example loopback plugin with one deliberate fault (FAULT_*), so the
 * tests see `plugins --check` fail the check that the fault breaks. Built with
 * -I Plugins/Example -I Sources/CTransportABI/include -DFAULT_<NAME>.
 */
#define te_transport_plugin_entry example_plugin_entry
#include "loopback_plugin.c"
#undef te_transport_plugin_entry

#include <signal.h>

/* Each build uses one fault; the others stay unused. */
#pragma GCC diagnostic ignored "-Wunused-function"

/* FAULT_SHARED_ERROR: one last_error text for every thread. */
static char shared_error[256];

static int32_t shared_submit(te_instance *self, const te_request *r, size_t count, size_t stride, size_t *accepted) {
    int32_t status = submit(self, r, count, stride, accepted);
    if (status != TE_OK) snprintf(shared_error, sizeof shared_error, "%s", error_text);
    return status;
}

static int32_t shared_open_peer(te_instance *self, const char *segment, const char *descriptor, uint64_t *handle) {
    int32_t status = open_peer(self, segment, descriptor, handle);
    if (status != TE_OK) snprintf(shared_error, sizeof shared_error, "%s", error_text);
    return status;
}

static const char *shared_last_error(te_instance *self) { (void)self; return shared_error; }

/* FAULT_CRASH: a peer descriptor that starts with '[' kills the process. */
static int32_t crashing_open_peer(te_instance *self, const char *segment, const char *descriptor, uint64_t *handle) {
    if (descriptor && descriptor[0] == '[') raise(SIGSEGV);
    return open_peer(self, segment, descriptor, handle);
}

/* FAULT_TWICE: every completion is reported a second time by the next poll. */
static te_completion again[64];
static size_t again_count;

static int32_t twice_poll(te_instance *self, te_completion *out, size_t capacity, size_t stride, uint64_t timeout, size_t *count) {
    pthread_mutex_lock(&self->lock);
    size_t repeat = again_count < capacity ? again_count : capacity;
    for (size_t i = 0; i < repeat; i++) memcpy((char *)out + i * stride, &again[i], sizeof(te_completion));
    again_count = 0;
    pthread_mutex_unlock(&self->lock);
    if (repeat) { *count = repeat; return TE_OK; }
    int32_t status = poll_completions(self, out, capacity, stride, timeout, count);
    pthread_mutex_lock(&self->lock);
    for (size_t i = 0; status == TE_OK && i < *count && again_count < 64; i++) memcpy(&again[again_count++], (char *)out + i * stride, sizeof(te_completion));
    pthread_mutex_unlock(&self->lock);
    return status;
}

/* FAULT_NO_REVOKE: the owner says yes to every range, registered or not. */
static int32_t trusting_on_handshake(te_instance *self, const char *request, te_buffer *reply) {
    if (request && strstr(request, "\"loop_check\"")) {
        char text[80];
        snprintf(text, sizeof text, "{\"loop_ok\":1,\"loop_pid\":%d}", (int)getpid());
        return put(reply, text);
    }
    return on_handshake(self, request, reply);
}

/* FAULT_HANG: a handshake request that starts with '[' never returns. */
static int32_t hanging_on_handshake(te_instance *self, const char *request, te_buffer *reply) {
    if (request && request[0] == '[') for (;;) pause();
    return on_handshake(self, request, reply);
}

static te_plugin_descriptor broken;

__attribute__((visibility("default"))) const te_plugin_descriptor *te_transport_plugin_entry(void) {
    broken = descriptor;
#if defined(FAULT_SHARED_ERROR)
    broken.submit = shared_submit;
    broken.open_peer = shared_open_peer;
    broken.last_error = shared_last_error;
#elif defined(FAULT_CRASH)
    broken.open_peer = crashing_open_peer;
#elif defined(FAULT_TWICE)
    broken.poll = twice_poll;
#elif defined(FAULT_NO_REVOKE)
    broken.on_handshake = trusting_on_handshake;
#elif defined(FAULT_HANG)
    broken.on_handshake = hanging_on_handshake;
#elif defined(FAULT_SIZE)
    broken.struct_size = (uint32_t)TE_PLUGIN_DESCRIPTOR_V1_SIZE; /* says this header's minor, sized as 1.0 */
#endif
    return &broken;
}
