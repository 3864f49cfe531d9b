/* Exercises upstream's newer C entry points of libtransfer_engine_c.so: createTransferEngine's
 * ip_or_host_name, rpc_port and auto_discover; removeLocalSegment, warmupEfaSegment,
 * discoverTopology, showLinks, getNicLoadStats; and, as `capi_extras graceful URL`,
 * enableGracefulShutdown (the test sends SIGTERM and looks at the metadata server).
 *   capi_extras RPC_PORT          (a free port the test picked) */
#include "transfer_engine_c.h"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int passed, failed;
#define CHECK(cond) do { if (cond) passed++; else { failed++; fprintf(stderr, "FAILED line %d: %s (last error: %s)\n", __LINE__, #cond, te_last_error()); } } while (0)

static int graceful(const char *metadata) {
    transfer_engine_t engine = createTransferEngine(metadata, "capi-graceful", "127.0.0.1", 0, 0);
    if (!engine) { fprintf(stderr, "create: %s\n", te_last_error()); return 2; }
    enableGracefulShutdown(engine);
    printf("READY\n");
    fflush(stdout);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "graceful")) return graceful(argv[2]);
    if (argc != 2) { fprintf(stderr, "usage: capi_extras RPC_PORT | graceful METADATA_URL\n"); return 2; }
    unsigned port = (unsigned)atoi(argv[1]);
    char name[128], expected[128], text[4096];

    /* rpc_port is the handshake port, and a taken one is an error; ip_or_host_name names the host. */
    setenv("MC_METRICS", "1", 1); /* engines created from here on record metrics */
    transfer_engine_t target = createTransferEngine("P2PHANDSHAKE", "localhost", "127.0.0.1", port, 0);
    CHECK(target != NULL);
    if (!target) { printf("capi extras: %d passed, %d failed\n", passed, failed); return 1; }
    snprintf(expected, sizeof expected, "127.0.0.1:%u", port);
    CHECK(getLocalIpAndPort(target, name, sizeof name) == 0 && !strcmp(name, expected));
    CHECK(createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, port, 0) == NULL);
    CHECK(strstr(te_last_error(), "rpc port") != NULL);
    CHECK(createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, 70000, 0) == NULL);
    /* auto_discover: the chosen transports find their devices (tcp has none to find). */
    transfer_engine_t initiator = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, 0, 1);
    CHECK(initiator != NULL);
    if (!initiator) { printf("capi extras: %d passed, %d failed\n", passed, failed); return 1; }

    enum { SIZE = 64 << 10 };
    char *remote = aligned_alloc(4096, SIZE), *local = aligned_alloc(4096, SIZE);
    memset(local, 0x5a, SIZE);
    CHECK(registerLocalMemory(target, remote, SIZE, "cpu:0", 1) == 0);
    CHECK(registerLocalMemory(initiator, local, SIZE, "cpu:0", 1) == 0);

    /* warmupEfaSegment opens the segment (nothing but tcp to connect here); a bad name fails. */
    CHECK(warmupEfaSegment(initiator, name) == 0);
    CHECK(warmupEfaSegment(initiator, "127.0.0.1:1") == ERR_INVALID_ARGUMENT);
    CHECK(warmupEfaSegment(initiator, "") == 0);
    CHECK(getLocalIpAndPort(initiator, text, sizeof text) == 0 && warmupEfaSegment(initiator, text) == 0);
    CHECK(warmupEfaSegment(initiator, NULL) == ERR_INVALID_ARGUMENT);
    segment_id_t peer = openSegment(initiator, name);
    CHECK(peer > 0);
    CHECK(te_transfer_sync(initiator, peer, OPCODE_WRITE, local, (uint64_t)(uintptr_t)remote, SIZE) == 0);
    CHECK(memcmp(local, remote, SIZE) == 0);

    /* removeLocalSegment forgets the cached segment: its id stops working, a new open works. */
    char slashed[160];
    snprintf(slashed, sizeof slashed, "//%s", name);
    CHECK(removeLocalSegment(initiator, slashed) == 0);
    CHECK(te_transfer_sync(initiator, peer, OPCODE_READ, local, (uint64_t)(uintptr_t)remote, 4096) != 0);
    CHECK(removeLocalSegment(initiator, name) == 0);            /* already forgotten: fine */
    CHECK(removeLocalSegment(initiator, "127.0.0.1:9") == 0);   /* never opened: fine */
    CHECK(removeLocalSegment(initiator, "") == ERR_INVALID_ARGUMENT);
    CHECK(removeLocalSegment(initiator, "///") == ERR_INVALID_ARGUMENT);
    segment_id_t again = openSegment(initiator, name);
    CHECK(again > 0 && again != peer);
    CHECK(te_transfer_sync(initiator, again, OPCODE_READ, local, (uint64_t)(uintptr_t)remote, SIZE) == 0);

    /* Topology and links: tcp publishes no NICs; text and JSON forms, cut to the buffer. */
    CHECK(discoverTopology(initiator) == 0);
    CHECK(discoverTopology((transfer_engine_t)0x1234) == -1);
    CHECK(showLinks(initiator, text, sizeof text, 0) == 0 && strstr(text, "=== Local NICs ===") != NULL);
    CHECK(showLinks(initiator, text, sizeof text, 1) == 0 && !strncmp(text, "{", 1) && strstr(text, "\"local_nics\":[]") != NULL
          && strstr(text, "\"topology\"") != NULL);
    CHECK(showLinks(initiator, text, 8, 0) == 0 && strlen(text) == 7);
    CHECK(showLinks(initiator, NULL, 8, 0) == -1);
    nic_load_stat_t stats[4];
    size_t count = 4;
    CHECK(getNicLoadStats(initiator, stats, &count) == 0 && count == 0);
    CHECK(getNicLoadStats(initiator, NULL, &count) == -1);

    /* getMetrics: JSON and Prometheus text of what moved above; snprintf-like length; bad arguments. */
    static char metrics[1 << 16];
    int length = getMetrics(initiator, metrics, sizeof metrics, 0);
    CHECK(length > 0 && length < (int)sizeof metrics && !strncmp(metrics, "{\"enabled\":true,", 16)
          && strstr(metrics, "\"te_transferred_bytes_total\"") != NULL);
    CHECK(getMetrics(initiator, metrics, 8, 0) == length && strlen(metrics) == 7);
    CHECK(getMetrics(initiator, metrics, sizeof metrics, 1) > 0 && strstr(metrics, "# TYPE te_transferred_bytes_total counter") != NULL);
    CHECK(getMetrics(initiator, NULL, 8, 0) == -1);
    CHECK(getMetrics((transfer_engine_t)0x1234, metrics, sizeof metrics, 0) == -1);

    destroyTransferEngine(initiator);
    destroyTransferEngine(target);
    free(remote);
    free(local);
    printf("capi extras: %d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
