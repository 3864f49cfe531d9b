#define _GNU_SOURCE
#include "ascend_shim.h"

#include <dlfcn.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Layouts from hcomm_res_defs.h and hixl_cs.h (HIXL's C API), only what is used. */
typedef struct {
    int32_t type; /* CommAddrType */
    union { uint8_t raws[36]; struct in_addr addr; struct in6_addr addr6; uint32_t id; uint8_t eid[16]; };
} CommAddr;
typedef struct {
    int32_t locType; /* EndpointLocType: 0 device, 1 host */
    union {
        uint8_t raws[60];
        struct { uint32_t devPhyId, superDevId, serverIdx, superPodIdx; } device;
        struct { uint32_t id; } host;
    };
} EndpointLoc;
typedef struct {
    int32_t protocol; /* CommProtocol */
    CommAddr commAddr;
    EndpointLoc loc;
    union { uint8_t raws[52]; };
} EndpointDesc;
typedef struct { int32_t type; void *addr; uint64_t size; } CommMem; /* CommMemType: 0 device, 1 host */
typedef struct { const char *global_resource_config; uint8_t reserved[120]; } HixlConfig;
typedef struct {
    const EndpointDesc *local_endpoint, *remote_endpoint;
    const char *server_ip;
    uint32_t server_port;
    uint8_t tc, sl;
    uint8_t reserved[98];
} HixlClientDesc;
typedef struct {
    const EndpointDesc *endpoint_list;
    const char *server_ip;
    uint32_t server_port, endpoint_list_num;
    uint8_t reserved[104];
} HixlServerDesc;
typedef struct { void *remote_buf, *local_buf; uint64_t len; } HixlOneSideOpDesc;

_Static_assert(sizeof(EndpointDesc) == 160, "EndpointDesc layout");
_Static_assert(sizeof(HixlConfig) == 128 && sizeof(HixlClientDesc) == 128 && sizeof(HixlServerDesc) == 128, "128-byte HIXL descs");
_Static_assert(sizeof(CommMem) == 24 && sizeof(HixlOneSideOpDesc) == 24, "CommMem, HixlOneSideOpDesc");

typedef uint32_t HixlStatus;
static struct {
    HixlStatus (*serverCreate)(const HixlServerDesc *, const HixlConfig *, void **);
    HixlStatus (*serverRegMem)(void *, const char *, const CommMem *, void **);
    HixlStatus (*serverListen)(void *, uint32_t);
    HixlStatus (*serverUnregMem)(void *, void *);
    HixlStatus (*serverDestroy)(void *);
    HixlStatus (*clientCreate)(const HixlClientDesc *, const HixlConfig *, void **);
    HixlStatus (*clientConnect)(void *, uint32_t);
    HixlStatus (*clientGetRemoteMem)(void *, CommMem **, char ***, uint32_t *, uint32_t);
    HixlStatus (*clientRegMem)(void *, const char *, const CommMem *, void **);
    HixlStatus (*clientUnregMem)(void *, void *);
    HixlStatus (*clientBatchPutAsync)(void *, uint32_t, const HixlOneSideOpDesc *, void **);
    HixlStatus (*clientBatchGetAsync)(void *, uint32_t, const HixlOneSideOpDesc *, void **);
    HixlStatus (*clientQuery)(void *, void *, int32_t *);
    HixlStatus (*clientDestroy)(void *);
    int (*aclInit)(const char *);
    const char *(*aclGetRecentErrMsg)(void);
    int (*getDeviceCount)(uint32_t *);
    int (*setDevice)(int32_t);
    int (*getPhyDevId)(int32_t, int32_t *);
    int (*aclMalloc)(void **, size_t, int);
    int (*aclFree)(void *);
} cann;

enum { ACL_SUCCESS = 0, ACL_ERROR_REPEAT_INITIALIZE = 100002, ACL_MEM_MALLOC_HUGE_FIRST = 0 };

typedef struct { void **slot; const char *name; } symbol;

static int bind_symbols(void *handle, const symbol *table, size_t count, const char *library, char *error, size_t capacity) {
    for (size_t i = 0; i < count; i++) {
        *table[i].slot = dlsym(handle, table[i].name);
        if (!*table[i].slot) {
            if (error && capacity)
                snprintf(error, capacity, "%s has no %s (this CANN predates HIXL's C API, hixl_cs.h, which the plugin uses: install CANN 8.5.0 or newer with HIXL)",
                         library, table[i].name);
            return -1;
        }
    }
    return 0;
}

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int loaded = 0;

int ascend_load(const char *hixl_library, const char *acl_library, char *error, size_t capacity) {
    pthread_mutex_lock(&load_lock);
    if (loaded) {
        pthread_mutex_unlock(&load_lock);
        return 0;
    }
    const char *acl_name = acl_library && *acl_library ? acl_library : "libascendcl.so";
    const char *hixl_name = hixl_library && *hixl_library ? hixl_library : "libcann_hixl.so";
    /* ACL first: libcann_hixl.so itself links it, and a missing runtime is the likelier absence. */
    void *acl = dlopen(acl_name, RTLD_NOW | RTLD_GLOBAL);
    void *hixl = acl ? dlopen(hixl_name, RTLD_NOW | RTLD_LOCAL) : NULL;
    if (!acl || !hixl) {
        if (error && capacity) snprintf(error, capacity, "%s", dlerror());
        pthread_mutex_unlock(&load_lock);
        return -1;
    }
    const symbol acl_table[] = {
        {(void **)&cann.aclInit, "aclInit"},
        {(void **)&cann.getDeviceCount, "aclrtGetDeviceCount"},
        {(void **)&cann.setDevice, "aclrtSetDevice"},
        {(void **)&cann.getPhyDevId, "aclrtGetPhyDevIdByLogicDevId"},
        {(void **)&cann.aclMalloc, "aclrtMalloc"},
        {(void **)&cann.aclFree, "aclrtFree"},
    };
    const symbol hixl_table[] = {
        {(void **)&cann.serverCreate, "HixlCSServerCreate"},
        {(void **)&cann.serverRegMem, "HixlCSServerRegMem"},
        {(void **)&cann.serverListen, "HixlCSServerListen"},
        {(void **)&cann.serverUnregMem, "HixlCSServerUnregMem"},
        {(void **)&cann.serverDestroy, "HixlCSServerDestroy"},
        {(void **)&cann.clientCreate, "HixlCSClientCreate"},
        {(void **)&cann.clientConnect, "HixlCSClientConnect"},
        {(void **)&cann.clientGetRemoteMem, "HixlCSClientGetRemoteMem"},
        {(void **)&cann.clientRegMem, "HixlCSClientRegMem"},
        {(void **)&cann.clientUnregMem, "HixlCSClientUnregMem"},
        {(void **)&cann.clientBatchPutAsync, "HixlCSClientBatchPutAsync"},
        {(void **)&cann.clientBatchGetAsync, "HixlCSClientBatchGetAsync"},
        {(void **)&cann.clientQuery, "HixlCSClientQueryCompleteStatus"},
        {(void **)&cann.clientDestroy, "HixlCSClientDestroy"},
    };
    if (bind_symbols(acl, acl_table, sizeof acl_table / sizeof acl_table[0], acl_name, error, capacity) != 0 ||
        bind_symbols(hixl, hixl_table, sizeof hixl_table / sizeof hixl_table[0], hixl_name, error, capacity) != 0) {
        pthread_mutex_unlock(&load_lock);
        return -2;
    }
    cann.aclGetRecentErrMsg = (const char *(*)(void))dlsym(acl, "aclGetRecentErrMsg"); /* optional */
    int status = cann.aclInit(NULL);
    if (status == ACL_ERROR_REPEAT_INITIALIZE) status = ACL_SUCCESS; /* the application initialised ACL itself */
    if (status != ACL_SUCCESS && error && capacity) snprintf(error, capacity, "aclInit: error %d%s%s", status,
                                                           *ascend_recent_error() ? ": " : "", ascend_recent_error());
    loaded = status == ACL_SUCCESS;
    pthread_mutex_unlock(&load_lock);
    return status;
}

const char *ascend_recent_error(void) {
    const char *text = cann.aclGetRecentErrMsg ? cann.aclGetRecentErrMsg() : NULL;
    return text ? text : "";
}

int ascend_device_count(uint32_t *count) { return cann.getDeviceCount(count); }
int ascend_set_device(int32_t device) { return cann.setDevice(device); }
int ascend_physical_id(int32_t logical, int32_t *physical) { return cann.getPhyDevId(logical, physical); }

int ascend_malloc(uint64_t size, uint64_t *addr) {
    void *p = NULL;
    int status = cann.aclMalloc(&p, (size_t)size, ACL_MEM_MALLOC_HUGE_FIRST);
    *addr = (uint64_t)(uintptr_t)p;
    return status;
}

int ascend_free(uint64_t addr) { return cann.aclFree((void *)(uintptr_t)addr); }

static void endpoint_desc(const ascend_endpoint *in, EndpointDesc *out) {
    memset(out, 0, sizeof *out);
    out->protocol = in->protocol;
    out->commAddr.type = in->addr_type;
    if (in->addr_type == ASCEND_ADDR_IPV4) memcpy(&out->commAddr.addr, in->addr, 4);
    else if (in->addr_type == ASCEND_ADDR_IPV6) memcpy(&out->commAddr.addr6, in->addr, 16);
    else out->commAddr.id = in->id;
    out->loc.locType = 0;
    out->loc.device.devPhyId = in->dev_phy_id;
    /* No super pod: HIXL reads a super device id as set unless it is 0xFFFFFFFF. */
    out->loc.device.superDevId = UINT32_MAX;
}

static CommMem comm_mem(int device, uint64_t addr, uint64_t size) {
    CommMem mem = {device ? 0 : 1, (void *)(uintptr_t)addr, size};
    return mem;
}

int ascend_server_create(const ascend_endpoint *endpoints, uint32_t count, const char *ip, uint32_t port,
                         const char *config_json, void **server) {
    enum { MAX_ENDPOINTS = 16 };
    if (count > MAX_ENDPOINTS) return (int)ASCEND_HIXL_PARAM_INVALID;
    EndpointDesc list[MAX_ENDPOINTS];
    for (uint32_t i = 0; i < count; i++) endpoint_desc(&endpoints[i], &list[i]);
    HixlServerDesc desc;
    memset(&desc, 0, sizeof desc);
    desc.endpoint_list = list;
    desc.endpoint_list_num = count;
    desc.server_ip = ip;
    desc.server_port = port;
    HixlConfig config;
    memset(&config, 0, sizeof config);
    config.global_resource_config = config_json;
    *server = NULL;
    return (int)cann.serverCreate(&desc, &config, server);
}

int ascend_server_listen(void *server, uint32_t backlog) { return (int)cann.serverListen(server, backlog); }

int ascend_server_register(void *server, const char *tag, int device, uint64_t addr, uint64_t size, void **memory) {
    CommMem mem = comm_mem(device, addr, size);
    *memory = NULL;
    return (int)cann.serverRegMem(server, tag, &mem, memory);
}

int ascend_server_unregister(void *server, void *memory) { return (int)cann.serverUnregMem(server, memory); }
int ascend_server_destroy(void *server) { return (int)cann.serverDestroy(server); }

int ascend_client_create(const ascend_endpoint *local, const ascend_endpoint *remote, const char *server_ip,
                         uint32_t server_port, uint8_t traffic_class, uint8_t service_level, const char *config_json,
                         void **client) {
    EndpointDesc l, r;
    endpoint_desc(local, &l);
    endpoint_desc(remote, &r);
    HixlClientDesc desc;
    memset(&desc, 0, sizeof desc);
    desc.local_endpoint = &l;
    desc.remote_endpoint = &r;
    desc.server_ip = server_ip;
    desc.server_port = server_port;
    desc.tc = traffic_class;
    desc.sl = service_level;
    HixlConfig config;
    memset(&config, 0, sizeof config);
    config.global_resource_config = config_json;
    *client = NULL;
    return (int)cann.clientCreate(&desc, &config, client);
}

int ascend_client_connect(void *client, uint32_t timeout_ms) { return (int)cann.clientConnect(client, timeout_ms); }

int ascend_client_register(void *client, const char *tag, int device, uint64_t addr, uint64_t size, void **memory) {
    CommMem mem = comm_mem(device, addr, size);
    *memory = NULL;
    return (int)cann.clientRegMem(client, tag, &mem, memory);
}

int ascend_client_unregister(void *client, void *memory) { return (int)cann.clientUnregMem(client, memory); }

int ascend_client_remote_memory(void *client, uint64_t *starts, uint64_t *sizes, uint32_t capacity, uint32_t *count,
                                uint32_t timeout_ms) {
    CommMem *list = NULL;
    char **tags = NULL;
    uint32_t n = 0;
    HixlStatus status = cann.clientGetRemoteMem(client, &list, &tags, &n, timeout_ms);
    *count = status == 0 ? n : 0;
    for (uint32_t i = 0; status == 0 && list && i < n && i < capacity; i++) {
        starts[i] = (uint64_t)(uintptr_t)list[i].addr;
        sizes[i] = list[i].size;
    }
    return (int)status; /* the list stays HIXL's: it frees it on the next call */
}

int ascend_client_batch(void *client, int write, uint32_t count, const uint64_t *remote, const uint64_t *local,
                        const uint64_t *length, void **complete) {
    enum { MAX_OPS = 4096 };
    if (count == 0 || count > MAX_OPS) return (int)ASCEND_HIXL_PARAM_INVALID;
    HixlOneSideOpDesc *ops = malloc(count * sizeof *ops);
    if (!ops) return (int)ASCEND_HIXL_FAILED;
    for (uint32_t i = 0; i < count; i++) {
        ops[i].remote_buf = (void *)(uintptr_t)remote[i];
        ops[i].local_buf = (void *)(uintptr_t)local[i];
        ops[i].len = length[i];
    }
    *complete = NULL;
    HixlStatus status = (write ? cann.clientBatchPutAsync : cann.clientBatchGetAsync)(client, count, ops, complete);
    free(ops);
    return (int)status;
}

int ascend_client_query(void *client, void *complete, int *state) {
    int32_t s = ASCEND_WAITING;
    HixlStatus status = cann.clientQuery(client, complete, &s);
    *state = s;
    return (int)status;
}

int ascend_client_destroy(void *client) { return (int)cann.clientDestroy(client); }
