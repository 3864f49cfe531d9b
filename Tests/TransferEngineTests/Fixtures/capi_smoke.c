/* Exercises libtransfer_engine_c.so through transfer_engine_c.h from plain C:
 * two engines in one process, registration, a batch, status polling, a
 * notification, and bad arguments that must return error codes. */
#include "transfer_engine_c.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int passed, failed;
#define CHECK(cond) do { if (cond) passed++; else { failed++; fprintf(stderr, "FAILED line %d: %s (last error: %s)\n", __LINE__, #cond, te_last_error()); } } while (0)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

/* One request in its own batch, polled to completion (10 s at most): 0 when it completed. */
static int run_one(transfer_engine_t engine, segment_id_t segment, int opcode, void *local, uint64_t remote, uint64_t length) {
    batch_id_t batch = allocateBatchID(engine, 1);
    if (batch == INVALID_BATCH) return -1;
    struct transfer_request request = { opcode, local, segment, remote, length };
    int rc = submitTransfer(engine, batch, &request, 1);
    struct transfer_status status = { STATUS_WAITING, 0 };
    for (double deadline = now() + 10; rc == 0 && now() < deadline; usleep(100)) {
        if (getTransferStatus(engine, batch, 0, &status) != 0) { rc = -1; break; }
        if (status.status != STATUS_WAITING && status.status != STATUS_PENDING) break;
    }
    freeBatchID(engine, batch);
    return rc == 0 && status.status == STATUS_COMPLETED ? 0 : -1;
}

int main(void) {
    enum { SIZE = 1 << 20, BLOCK = 64 << 10 };
    /* Bad arguments first: errors, never crashes. */
    CHECK(createTransferEngine(NULL, "127.0.0.1", NULL, 0, 0) == NULL);
    CHECK(createTransferEngine("zookeeper://nowhere", "127.0.0.1", NULL, 0, 0) == NULL);
    CHECK(strlen(te_last_error()) > 0);
    CHECK(openSegment((transfer_engine_t)0x1234, "127.0.0.1:1") == -1);
    destroyTransferEngine((transfer_engine_t)0x1234);

    transfer_engine_t target = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, 0, 0);
    transfer_engine_t initiator = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, 0, 0);
    CHECK(target && initiator);
    if (!target || !initiator) { printf("capi: %d passed, %d failed\n", passed, failed); return 1; }
    CHECK(installTransport(initiator, "tcp", NULL) != NULL);
    CHECK(installTransport(initiator, "rdma", NULL) == NULL);
    CHECK(uninstallTransport(initiator, "tcp") != 0);
    CHECK(uninstallTransport(initiator, "rdma") != 0);
    {
        char protocols[64];
        CHECK(te_active_protocols(initiator, protocols, sizeof protocols) == 0 && strcmp(protocols, "tcp") == 0);
        CHECK(te_allocate_batch_timeout(initiator, 4, 0) == INVALID_BATCH);
        batch_id_t timed = te_allocate_batch_timeout(initiator, 4, 1000);
        CHECK(timed != INVALID_BATCH);
        CHECK(freeBatchID(initiator, timed) == 0);
    }

    char *remote = aligned_alloc(4096, SIZE), *local = aligned_alloc(4096, SIZE);
    memset(remote, 0, SIZE);
    for (int i = 0; i < SIZE; i++) local[i] = (char)(i * 7 + 3);
    CHECK(registerLocalMemory(target, remote, SIZE, "cpu:0", 1) == 0);
    buffer_entry_t entry = { local, SIZE };
    CHECK(registerLocalMemoryBatch(initiator, &entry, 1, "cpu:0") == 0);
    CHECK(registerLocalMemory(initiator, local + 100, 10, "cpu:0", 1) == ERR_ADDRESS_OVERLAPPED);
    CHECK(registerLocalMemory(initiator, NULL, 10, "cpu:0", 1) == ERR_INVALID_ARGUMENT);

    char name[128];
    CHECK(getLocalIpAndPort(target, name, sizeof name) == 0);
    CHECK(getLocalIpAndPort(target, name, 3) == -1);
    segment_id_t peer = openSegment(initiator, name);
    CHECK(peer > 0);
    CHECK(openSegment(initiator, "127.0.0.1:1") == -1);

    batch_id_t batch = allocateBatchID(initiator, 32);
    CHECK(batch != INVALID_BATCH);
    struct transfer_request requests[SIZE / BLOCK];
    for (int i = 0; i < SIZE / BLOCK; i++) {
        requests[i] = (struct transfer_request){ OPCODE_WRITE, local + i * BLOCK, peer, (uint64_t)(uintptr_t)(remote + i * BLOCK), BLOCK };
    }
    struct transfer_request bad = requests[0];
    bad.opcode = 7;
    CHECK(submitTransfer(initiator, batch, &bad, 1) == STATUS_CODE_INVALID_ARGUMENT);
    bad = requests[0];
    bad.target_offset = (uint64_t)(uintptr_t)(remote + SIZE - 8);
    CHECK(submitTransfer(initiator, batch, &bad, 1) == STATUS_CODE_ADDRESS_NOT_REGISTERED);
    CHECK(submitTransfer(initiator, INVALID_BATCH - 5, requests, 1) == STATUS_CODE_INVALID_ARGUMENT);

    notify_msg_t note = { "kv", "block 42 ready" };
    CHECK(submitTransferWithNotify(initiator, batch, requests, SIZE / BLOCK, note) == 0);
    int done = 0;
    for (double deadline = now() + 20; now() < deadline && done < SIZE / BLOCK; usleep(1000)) {
        done = 0;
        for (int i = 0; i < SIZE / BLOCK; i++) {
            struct transfer_status status;
            if (getTransferStatus(initiator, batch, i, &status) == 0 && status.status == STATUS_COMPLETED) done++;
        }
    }
    CHECK(done == SIZE / BLOCK);
    CHECK(memcmp(local, remote, SIZE) == 0);
    struct transfer_status status;
    CHECK(getTransferStatus(initiator, batch, 999, &status) == STATUS_CODE_INVALID_ARGUMENT);
    /* Transport hints: one naming nothing installed routes as usual. */
    CHECK(te_transfer_sync_hint(initiator, peer, OPCODE_READ, local, (uint64_t)(uintptr_t)remote, BLOCK, "rdma") == 0);
    CHECK(te_transfer_sync_hint(initiator, peer, OPCODE_WRITE, local, (uint64_t)(uintptr_t)remote, BLOCK, NULL) == 0);
    batch_id_t hinted = allocateBatchID(initiator, 2);
    CHECK(te_submit_transfer_hint(initiator, hinted, requests, 2, "tcp") == 0);
    for (double deadline = now() + 10; now() < deadline; usleep(1000)) {
        if (getTransferStatus(initiator, hinted, 1, &status) == 0 && status.status == STATUS_COMPLETED) break;
    }
    CHECK(status.status == STATUS_COMPLETED);
    CHECK(freeBatchID(initiator, hinted) == 0);
    CHECK(getTransferStatus(initiator, batch, 0, NULL) == STATUS_CODE_INVALID_ARGUMENT);

    int count = 0;
    notify_msg_t *notes = NULL;
    for (double deadline = now() + 10; now() < deadline && !notes; usleep(1000)) notes = getNotifsFromEngine(target, &count);
    CHECK(notes && count == 1 && !strcmp(notes[0].name, "kv") && !strcmp(notes[0].msg, "block 42 ready"));
    freeNotifsMsgBuf(notes, count);
    CHECK(genNotifyInEngine(initiator, (uint64_t)peer, note) == 0);
    CHECK(genNotifyInEngine(initiator, 9999, note) == ERR_METADATA);

    /* Stream jobs (the *_on_cuda host function): made now, run later from another thread. */
    CHECK(te_stream_job_create((transfer_engine_t)0x1234, requests, 1, NULL) == NULL && strstr(te_last_error(), "handle"));
    CHECK(te_stream_job_create(initiator, requests, 0, NULL) == NULL && strstr(te_last_error(), "at least one"));
    CHECK(te_stream_job_create(initiator, NULL, 2, NULL) == NULL);
    memset(remote, 0, SIZE);
    void *job = te_stream_job_create(initiator, requests, 2, "tcp");
    CHECK(job != NULL);
    te_stream_job_run(job); /* frees the job */
    CHECK(memcmp(local, remote, 2 * BLOCK) == 0);
    struct transfer_request outside = requests[0];
    outside.target_offset = (uint64_t)(uintptr_t)(remote + SIZE - 8);
    te_stream_job_run(te_stream_job_create(initiator, &outside, 1, NULL));
    char failures[512];
    int failures_length = te_stream_failures(initiator, failures, sizeof failures);
    CHECK(failures_length > 0 && strstr(failures, "1 requests (0 reads, 1 writes") && strstr(failures, "not inside one registered buffer"));
    CHECK(te_stream_failures(initiator, failures, 4) < -4);
    CHECK(te_stream_failures((transfer_engine_t)0x1234, failures, sizeof failures) == -1);
    CHECK(te_stream_failures(target, NULL, 0) == 0); /* none: 0, not a size */
    void *once = te_stream_job_create(initiator, requests, 1, NULL);
    CHECK(te_stream_jobs_pending(initiator) == 1);
    te_stream_job_discard(once);
    te_stream_job_run(once);      /* used already: ignored, not released twice */
    te_stream_job_discard(once);
    CHECK(te_stream_jobs_pending(initiator) == 0 && te_stream_jobs_pending((transfer_engine_t)0x1234) == -1);
    te_stream_job_run(NULL);
    te_stream_job_discard(NULL);

    /* The engine's own segment, opened by its own name (local copies): many rounds, each checked. */
    char *scratch = aligned_alloc(4096, BLOCK);
    CHECK(registerLocalMemory(target, scratch, BLOCK, "cpu:0", 1) == 0);
    segment_id_t self = openSegment(target, name);
    CHECK(self == 0);
    int self_ok = 0;
    for (int round = 0; round < 20; round++) {
        for (int i = 0; i < 4096; i++) scratch[i] = (char)(i + round);
        int wrote = run_one(target, self, OPCODE_WRITE, scratch, (uint64_t)(uintptr_t)(remote + round * 8), 4096) == 0;
        memset(scratch, 0, 4096);
        int read = run_one(target, self, OPCODE_READ, scratch, (uint64_t)(uintptr_t)(remote + round * 8), 4096) == 0;
        if (wrote && read && scratch[0] == (char)round && scratch[4095] == (char)(4095 + round)) self_ok++;
    }
    CHECK(self_ok == 20);
    CHECK(unregisterLocalMemory(target, scratch) == 0);
    free(scratch);

    CHECK(freeBatchID(initiator, batch) == 0);
    CHECK(freeBatchID(initiator, batch) == STATUS_CODE_INVALID_ARGUMENT);
    CHECK(syncSegmentCache(initiator) == 0);
    CHECK(closeSegment(initiator, peer) == 0);
    void *addresses[1] = { local };
    CHECK(unregisterLocalMemoryBatch(initiator, addresses, 1) == 0);
    CHECK(unregisterLocalMemory(initiator, local) == ERR_INVALID_ARGUMENT);
    /* A job whose engine was destroyed before the stream ran it moves nothing. */
    CHECK(registerLocalMemory(initiator, local, SIZE, "cpu:0", 1) == 0);
    memset(remote, 0, BLOCK);
    memset(local, 0x5a, BLOCK);
    struct transfer_request late_write = { OPCODE_WRITE, local, openSegment(initiator, name), (uint64_t)(uintptr_t)remote, BLOCK };
    CHECK(late_write.target_id > 0);
    void *late = te_stream_job_create(initiator, &late_write, 1, NULL);
    CHECK(late != NULL);
    destroyTransferEngine(initiator);
    te_stream_job_run(late);
    CHECK(remote[0] == 0 && remote[BLOCK - 1] == 0);
    destroyTransferEngine(target);
    CHECK(openSegment(initiator, name) == -1); /* a destroyed handle is refused, not dereferenced */
    printf("capi: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
