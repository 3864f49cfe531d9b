/* The C call sequence of NIXL's Mooncake backend (ai-dynamo/nixl src/plugins/mooncake), over
 * this engine, built the way that backend builds: #include "transfer_engine_c.h" and
 * -ltransfer_engine. Two agents, each with its own engine: connection info, openSegment,
 * registration with location "*", a 1024-entry batch written with a notification, polled the
 * way checkXfer does, freed; notifications fetched and freed; genNotif; teardown. */
#include "transfer_engine_c.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int passed, failed;
#define CHECK(cond) do { if (cond) passed++; else { failed++; fprintf(stderr, "FAILED line %d: %s (last error: %s)\n", __LINE__, #cond, te_last_error()); } } while (0)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(void) {
    enum { BLOCK = 4096, COUNT = 16 };
    /* The backend's constructor: the IP as local_server_name, no ip_or_host_name, rpc_port 0, auto_discover. */
    transfer_engine_t agent_a = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", "", 0, 1);
    transfer_engine_t agent_b = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", "", 0, 1);
    CHECK(agent_a && agent_b);
    if (!agent_a || !agent_b) { printf("nixl sequence: %d passed, %d failed\n", passed, failed); return 1; }
    char conn_a[64], conn_b[64];
    CHECK(getLocalIpAndPort(agent_a, conn_a, 64) == 0 && getLocalIpAndPort(agent_b, conn_b, 64) == 0);
    segment_id_t b_seen_by_a = openSegment(agent_a, conn_b);
    CHECK(b_seen_by_a >= 0);

    char *source = aligned_alloc(4096, BLOCK * COUNT), *target = aligned_alloc(4096, BLOCK * COUNT);
    for (int i = 0; i < BLOCK * COUNT; i++) source[i] = (char)(i * 13 + 1);
    memset(target, 0, BLOCK * COUNT);
    CHECK(registerLocalMemory(agent_a, source, BLOCK * COUNT, "*", 1) == 0);
    CHECK(registerLocalMemory(agent_b, target, BLOCK * COUNT, "*", 1) == 0);
    b_seen_by_a = openSegment(agent_a, conn_b);  /* loadRemoteConnInfo may come before or after registration */

    batch_id_t batch = allocateBatchID(agent_a, 1024);
    CHECK(batch != INVALID_BATCH);
    struct transfer_request requests[COUNT];
    for (int i = 0; i < COUNT; i++) {
        requests[i] = (struct transfer_request){ OPCODE_WRITE, source + i * BLOCK, b_seen_by_a, (uint64_t)(uintptr_t)(target + i * BLOCK), BLOCK };
    }
    notify_msg_t note = { "agent-a", "xfer done" };
    CHECK(submitTransferWithNotify(agent_a, batch, requests, COUNT, note) == 0);
    /* checkXfer: WAITING/PENDING in progress; a nonzero rc or FAILED an error; the rest done. */
    int done = 0, error = 0;
    for (double deadline = now() + 20; !done && !error && now() < deadline; usleep(500)) {
        done = 1;
        for (int i = 0; i < COUNT; i++) {
            struct transfer_status status;
            int rc = getTransferStatus(agent_a, batch, i, &status);
            if (rc != 0 || status.status == STATUS_FAILED) { error = 1; break; }
            if (status.status == STATUS_WAITING || status.status == STATUS_PENDING) done = 0;
        }
    }
    CHECK(done && !error);
    CHECK(freeBatchID(agent_a, batch) == 0);
    CHECK(memcmp(source, target, BLOCK * COUNT) == 0);

    int count = 0;
    notify_msg_t *notes = NULL;
    for (double deadline = now() + 10; !notes && now() < deadline; usleep(1000)) notes = getNotifsFromEngine(agent_b, &count);
    CHECK(notes && count == 1 && !strcmp(notes[0].name, "agent-a") && !strcmp(notes[0].msg, "xfer done"));
    if (notes) CHECK(freeNotifsMsgBuf(notes, count) == 0);
    CHECK(genNotifyInEngine(agent_a, (uint64_t)b_seen_by_a, note) == 0);
    notes = NULL;
    for (double deadline = now() + 10; !notes && now() < deadline; usleep(1000)) notes = getNotifsFromEngine(agent_b, &count);
    CHECK(notes && count == 1);
    if (notes) freeNotifsMsgBuf(notes, count);
    /* The backend hands over whatever its user sent (NIXL's Python examples send pickled bytes):
     * bytes that are not UTF-8 are delivered replaced by U+FFFD. */
    notify_msg_t binary = { "agent-a", "\x80\x04\x95ok" };
    CHECK(genNotifyInEngine(agent_a, (uint64_t)b_seen_by_a, binary) == 0);
    notes = NULL;
    for (double deadline = now() + 10; !notes && now() < deadline; usleep(1000)) notes = getNotifsFromEngine(agent_b, &count);
    CHECK(notes && count == 1 && !strcmp(notes[0].msg, "\xef\xbf\xbd\x04\xef\xbf\xbdok"));
    if (notes) freeNotifsMsgBuf(notes, count);

    CHECK(unregisterLocalMemory(agent_a, source) == 0 && unregisterLocalMemory(agent_b, target) == 0);
    destroyTransferEngine(agent_a);
    destroyTransferEngine(agent_b);
    free(source);
    free(target);
    printf("nixl sequence: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
