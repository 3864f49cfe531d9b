/* A stand-in for CANN (libascendcl.so + libcann_hixl.so in one file) that the
 * ascend plugin tests build: it exports the entry points the plugin binds, with
 * the signatures of CANN's public headers, so loading, probing and the plugin's
 * own logic run on a machine without an NPU.
 *
 * STANDIN_NPUS (environment, or -DSTANDIN_NPUS_DEFAULT, else 0): how many NPUs it reports. With 0,
 * aclrtGetDeviceCount fails the way a host without the driver's devices does,
 * with an error text. With 1 or more, "NPU memory" is host memory and HIXL's
 * one-sided puts and gets are process_vm_writev/readv into the server's process,
 * whose registered ranges it publishes in STANDIN_DIR/<port> (or
 * -DSTANDIN_DIR_DEFAULT, else /tmp/te-standin-hixl): a range the server unregistered is refused as a real
 * HIXL server's NIC would refuse it. A batch finishes on its second query.
 * Build with -DSTANDIN_OMIT_QUERY to lack HixlCSClientQueryCompleteStatus (an
 * older CANN). Not thread-safe beyond what the plugin needs (one lock). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

typedef struct { int32_t type; void *addr; uint64_t size; } CommMem;
typedef struct { const char *global_resource_config; uint8_t reserved[120]; } HixlConfig;
typedef struct { const void *local_endpoint, *remote_endpoint; const char *server_ip; uint32_t server_port; uint8_t tc, sl, reserved[98]; } HixlClientDesc;
typedef struct { const void *endpoint_list; const char *server_ip; uint32_t server_port, endpoint_list_num; uint8_t reserved[104]; } HixlServerDesc;
typedef struct { void *remote_buf, *local_buf; uint64_t len; } HixlOneSideOpDesc;

enum { OK = 0, PARAM_INVALID = 103900, FAILED = 503900, MAX_RANGES = 256 };
enum { WAITING = 0, COMPLETED = 1, STATE_FAILED = 3 };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static __thread char recent[256];

#ifndef STANDIN_NPUS_DEFAULT
#define STANDIN_NPUS_DEFAULT 0
#endif
#ifndef STANDIN_DIR_DEFAULT
#define STANDIN_DIR_DEFAULT "/tmp/te-standin-hixl"
#endif
static int npus(void) { const char *n = getenv("STANDIN_NPUS"); return n ? atoi(n) : STANDIN_NPUS_DEFAULT; }
static const char *directory(void) { const char *d = getenv("STANDIN_DIR"); return d && *d ? d : STANDIN_DIR_DEFAULT; }

int aclInit(const char *config) { (void)config; return 0; }
const char *aclGetRecentErrMsg(void) { return recent; }
int aclrtGetDeviceCount(uint32_t *count) {
    *count = (uint32_t)npus();
    if (*count == 0) {
        snprintf(recent, sizeof recent, "EL0003: stand-in runtime: the driver reports no NPU device");
        return 507033;
    }
    return 0;
}
int aclrtSetDevice(int32_t device) { return device >= 0 && device < npus() ? 0 : 107001; }
int aclrtGetPhyDevIdByLogicDevId(int32_t logical, int32_t *physical) { *physical = logical; return 0; }
int aclrtMalloc(void **p, size_t size, int policy) { (void)policy; return posix_memalign(p, 4096, size) ? 207001 : 0; }
int aclrtFree(void *p) { free(p); return 0; }

typedef struct { uint64_t start, size; } range;
typedef struct { char ip[64]; uint32_t port; int fd; range ranges[MAX_RANGES]; void *mems[MAX_RANGES]; int count; } server;
typedef struct { char ip[64]; uint32_t port; pid_t pid; range local[MAX_RANGES]; int nlocal; CommMem *remote; } client;
typedef struct { int write, queries; uint32_t count; HixlOneSideOpDesc *ops; uint32_t port; pid_t pid; } batch;

/* Publishes a server's pid and ranges in STANDIN_DIR/<port> (written whole, then renamed). */
static void publish(server *s) {
    if (s->fd < 0) return;
    char path[512], tmp[520];
    mkdir(directory(), 0777);
    snprintf(path, sizeof path, "%s/%u", directory(), s->port);
    snprintf(tmp, sizeof tmp, "%s.%d", path, getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "%d\n", getpid());
    for (int i = 0; i < s->count; i++) fprintf(f, "%llu %llu\n", (unsigned long long)s->ranges[i].start, (unsigned long long)s->ranges[i].size);
    fclose(f);
    rename(tmp, path);
}

/* Reads a server's file: its pid and ranges; -1 when there is none. */
static int lookup(uint32_t port, pid_t *pid, range *ranges, int *count) {
    char path[512];
    snprintf(path, sizeof path, "%s/%u", directory(), port);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    int p = 0, n = 0;
    unsigned long long a, b;
    if (fscanf(f, "%d", &p) != 1) { fclose(f); return -1; }
    while (n < MAX_RANGES && fscanf(f, "%llu %llu", &a, &b) == 2) ranges[n++] = (range){a, b};
    fclose(f);
    *pid = p;
    *count = n;
    return kill(p, 0) == 0 || errno == EPERM ? 0 : -1;
}

static int inside(const range *ranges, int n, uint64_t addr, uint64_t len) {
    for (int i = 0; i < n; i++)
        if (addr >= ranges[i].start && addr - ranges[i].start <= ranges[i].size && len <= ranges[i].size - (addr - ranges[i].start)) return 1;
    return 0;
}

uint32_t HixlCSServerCreate(const HixlServerDesc *desc, const HixlConfig *config, void **handle) {
    (void)config;
    if (!desc || !desc->server_ip || !handle || desc->server_port > 65535) return PARAM_INVALID;
    server *s = calloc(1, sizeof *s);
    snprintf(s->ip, sizeof s->ip, "%s", desc->server_ip);
    s->port = desc->server_port;
    s->fd = -1;
    prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0); /* clients reach this process's memory */
    *handle = s;
    return OK;
}

uint32_t HixlCSServerListen(void *handle, uint32_t backlog) {
    server *s = handle;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    if (inet_pton(AF_INET, s->ip, &a.sin_addr) != 1) return PARAM_INVALID;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, (int)backlog) != 0) {
        snprintf(recent, sizeof recent, "EI0006: stand-in HIXL: cannot listen on %s:%u: %s", s->ip, s->port, strerror(errno));
        if (fd >= 0) close(fd);
        return FAILED;
    }
    pthread_mutex_lock(&lock);
    s->fd = fd;
    publish(s);
    pthread_mutex_unlock(&lock);
    return OK;
}

uint32_t HixlCSServerRegMem(void *handle, const char *tag, const CommMem *mem, void **out) {
    server *s = handle;
    if (!s || !tag || !mem || !mem->addr || !mem->size || !out) return PARAM_INVALID;
    pthread_mutex_lock(&lock);
    if (s->count == MAX_RANGES) { pthread_mutex_unlock(&lock); return FAILED; }
    s->ranges[s->count] = (range){(uint64_t)(uintptr_t)mem->addr, mem->size};
    s->mems[s->count] = malloc(1);
    *out = s->mems[s->count++];
    publish(s);
    pthread_mutex_unlock(&lock);
    return OK;
}

uint32_t HixlCSServerUnregMem(void *handle, void *mem) {
    server *s = handle;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < s->count; i++) {
        if (s->mems[i] != mem) continue;
        free(mem);
        s->ranges[i] = s->ranges[s->count - 1];
        s->mems[i] = s->mems[--s->count];
        publish(s);
        pthread_mutex_unlock(&lock);
        return OK;
    }
    pthread_mutex_unlock(&lock);
    return PARAM_INVALID;
}

uint32_t HixlCSServerDestroy(void *handle) {
    server *s = handle;
    char path[512];
    snprintf(path, sizeof path, "%s/%u", directory(), s->port);
    if (s->fd >= 0) { unlink(path); close(s->fd); }
    for (int i = 0; i < s->count; i++) free(s->mems[i]);
    free(s);
    return OK;
}

uint32_t HixlCSClientCreate(const HixlClientDesc *desc, const HixlConfig *config, void **handle) {
    (void)config;
    if (!desc || !desc->server_ip || !desc->local_endpoint || !desc->remote_endpoint || !handle) return PARAM_INVALID;
    client *c = calloc(1, sizeof *c);
    snprintf(c->ip, sizeof c->ip, "%s", desc->server_ip);
    c->port = desc->server_port;
    *handle = c;
    return OK;
}

uint32_t HixlCSClientRegMem(void *handle, const char *tag, const CommMem *mem, void **out) {
    client *c = handle;
    if (!c || !tag || !mem || !out || c->nlocal == MAX_RANGES) return PARAM_INVALID;
    c->local[c->nlocal] = (range){(uint64_t)(uintptr_t)mem->addr, mem->size};
    *out = &c->local[c->nlocal++];
    return OK;
}

uint32_t HixlCSClientUnregMem(void *handle, void *mem) { (void)handle; (void)mem; return OK; }

uint32_t HixlCSClientConnect(void *handle, uint32_t timeout_ms) {
    (void)timeout_ms;
    client *c = handle;
    range ranges[MAX_RANGES];
    int n;
    if (lookup(c->port, &c->pid, ranges, &n) != 0) {
        snprintf(recent, sizeof recent, "EI0006: stand-in HIXL: no server listens on %s:%u", c->ip, c->port);
        return FAILED;
    }
    return OK;
}

uint32_t HixlCSClientGetRemoteMem(void *handle, CommMem **list, char ***tags, uint32_t *count, uint32_t timeout_ms) {
    (void)timeout_ms;
    client *c = handle;
    range ranges[MAX_RANGES];
    int n;
    pid_t pid;
    if (lookup(c->port, &pid, ranges, &n) != 0) return FAILED;
    free(c->remote);
    c->remote = calloc((size_t)n + 1, sizeof(CommMem));
    for (int i = 0; i < n; i++) c->remote[i] = (CommMem){1, (void *)(uintptr_t)ranges[i].start, ranges[i].size};
    *list = c->remote;
    *tags = NULL;
    *count = (uint32_t)n;
    return OK;
}

static uint32_t post(void *handle, int write, uint32_t n, const HixlOneSideOpDesc *ops, void **complete) {
    client *c = handle;
    if (!c || !ops || !n || !complete) return PARAM_INVALID;
    for (uint32_t i = 0; i < n; i++)
        if (!inside(c->local, c->nlocal, (uint64_t)(uintptr_t)ops[i].local_buf, ops[i].len)) return PARAM_INVALID;
    batch *b = calloc(1, sizeof *b);
    b->write = write;
    b->count = n;
    b->ops = malloc(n * sizeof *ops);
    memcpy(b->ops, ops, n * sizeof *ops);
    b->port = c->port;
    b->pid = c->pid;
    *complete = b;
    return OK;
}

uint32_t HixlCSClientBatchPutAsync(void *c, uint32_t n, const HixlOneSideOpDesc *ops, void **h) { return post(c, 1, n, ops, h); }
uint32_t HixlCSClientBatchGetAsync(void *c, uint32_t n, const HixlOneSideOpDesc *ops, void **h) { return post(c, 0, n, ops, h); }

/* Moves a batch: every remote range must be registered with the server now. */
static int run(batch *b) {
    range ranges[MAX_RANGES];
    int n;
    pid_t pid;
    if (lookup(b->port, &pid, ranges, &n) != 0 || pid != b->pid) return STATE_FAILED;
    for (uint32_t i = 0; i < b->count; i++) {
        HixlOneSideOpDesc *op = &b->ops[i];
        if (!inside(ranges, n, (uint64_t)(uintptr_t)op->remote_buf, op->len)) return STATE_FAILED;
        struct iovec local = {op->local_buf, op->len}, remote = {op->remote_buf, op->len};
        ssize_t moved = b->write ? process_vm_writev(pid, &local, 1, &remote, 1, 0) : process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (moved != (ssize_t)op->len) return STATE_FAILED;
    }
    return COMPLETED;
}

#ifndef STANDIN_OMIT_QUERY
uint32_t HixlCSClientQueryCompleteStatus(void *handle, void *complete, int32_t *status) {
    (void)handle;
    batch *b = complete;
    if (!b || !status) return PARAM_INVALID;
    if (b->queries++ == 0) { *status = WAITING; return OK; }
    *status = run(b);
    free(b->ops);
    free(b);
    return OK;
}
#endif

uint32_t HixlCSClientDestroy(void *handle) {
    client *c = handle;
    free(c->remote);
    free(c);
    return OK;
}
