/* CANN bound at run time with dlopen, behind a few ascend_* calls: HIXL's C
 * client/server API (hixl_cs.h, in libcann_hixl.so) and the ACL runtime
 * (libascendcl.so). No Debian package carries CANN, so the entry points and the
 * structures they take are declared in ascend_shim.c from the public headers
 * (github.com/hicann/hixl include/cs/hixl_cs.h and hcomm_res_defs.h).
 * Functions return the library's status (0 = success) unless stated. */
#ifndef ASCEND_SHIM_H
#define ASCEND_SHIM_H
#include <stddef.h>
#include <stdint.h>

/** HIXL's status codes (hixl_cs.h). */
#define ASCEND_HIXL_PARAM_INVALID 103900u
#define ASCEND_HIXL_TIMEOUT 103901u
#define ASCEND_HIXL_FAILED 503900u

/** Endpoint protocols (CommProtocol) this plugin uses. */
#define ASCEND_PROTOCOL_HCCS 0
#define ASCEND_PROTOCOL_ROCE 1

/** Address kinds (CommAddrType). */
#define ASCEND_ADDR_IPV4 0
#define ASCEND_ADDR_IPV6 1
#define ASCEND_ADDR_ID 2

/** Completion states (HixlCompleteStatus). */
#define ASCEND_WAITING 0
#define ASCEND_COMPLETED 1
#define ASCEND_TIMED_OUT 2
#define ASCEND_FAILED 3

/** One communication endpoint of an NPU, in plain fields (turned into HIXL's EndpointDesc). */
typedef struct {
    int32_t protocol;      /**< ASCEND_PROTOCOL_* */
    int32_t addr_type;     /**< ASCEND_ADDR_* */
    uint8_t addr[16];      /**< IPv4 (4 bytes) or IPv6 (16), network order */
    uint32_t id;           /**< for ASCEND_ADDR_ID: the device's physical id */
    uint32_t dev_phy_id;   /**< the NPU the endpoint sits on */
} ascend_endpoint;

/**
 * Loads libcann_hixl.so and libascendcl.so (or the paths given), resolves the
 * entry points and calls aclInit. Returns 0; -1 when a library is missing
 * (error: dlerror); -2 when one lacks an entry point (error names it: the CANN
 * release is older than the API); otherwise aclInit's status (error: its text).
 * Safe to call repeatedly; a failed load is tried again.
 */
int ascend_load(const char *hixl_library, const char *acl_library, char *error, size_t error_capacity);
/** The ACL runtime's latest error text (aclGetRecentErrMsg), or "" . Never NULL. */
const char *ascend_recent_error(void);
/** aclrtGetDeviceCount. */
int ascend_device_count(uint32_t *count);
/** aclrtSetDevice on the calling thread. */
int ascend_set_device(int32_t device);
/** aclrtGetPhyDevIdByLogicDevId. */
int ascend_physical_id(int32_t logical, int32_t *physical);
/** aclrtMalloc (huge pages first). */
int ascend_malloc(uint64_t size, uint64_t *addr);
/** aclrtFree. */
int ascend_free(uint64_t addr);

/** HixlCSServerCreate with `count` endpoints listening on ip:port; config_json may be NULL. */
int ascend_server_create(const ascend_endpoint *endpoints, uint32_t count, const char *ip, uint32_t port,
                         const char *config_json, void **server);
/** HixlCSServerListen. */
int ascend_server_listen(void *server, uint32_t backlog);
/** HixlCSServerRegMem (device = 1: NPU memory, 0: host memory). */
int ascend_server_register(void *server, const char *tag, int device, uint64_t addr, uint64_t size, void **memory);
/** HixlCSServerUnregMem. */
int ascend_server_unregister(void *server, void *memory);
/** HixlCSServerDestroy. */
int ascend_server_destroy(void *server);

/** HixlCSClientCreate towards the server at ip:port. */
int ascend_client_create(const ascend_endpoint *local, const ascend_endpoint *remote, const char *server_ip,
                         uint32_t server_port, uint8_t traffic_class, uint8_t service_level, const char *config_json,
                         void **client);
/** HixlCSClientConnect. */
int ascend_client_connect(void *client, uint32_t timeout_ms);
/** HixlCSClientRegMem. */
int ascend_client_register(void *client, const char *tag, int device, uint64_t addr, uint64_t size, void **memory);
/** HixlCSClientUnregMem. */
int ascend_client_unregister(void *client, void *memory);
/**
 * HixlCSClientGetRemoteMem: up to `capacity` of the server's registered ranges
 * into starts/sizes; *count = how many the server has (may exceed capacity).
 */
int ascend_client_remote_memory(void *client, uint64_t *starts, uint64_t *sizes, uint32_t capacity, uint32_t *count,
                                uint32_t timeout_ms);
/** HixlCSClientBatchPutAsync (write = 1) or BatchGetAsync of `count` operations. */
int ascend_client_batch(void *client, int write, uint32_t count, const uint64_t *remote, const uint64_t *local,
                        const uint64_t *length, void **complete);
/** HixlCSClientQueryCompleteStatus; *state = ASCEND_WAITING, _COMPLETED, _TIMED_OUT or _FAILED. */
int ascend_client_query(void *client, void *complete, int *state);
/** HixlCSClientDestroy. */
int ascend_client_destroy(void *client);

#endif
