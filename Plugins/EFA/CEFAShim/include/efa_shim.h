/* Thin C wrappers over libfabric for the efa plugin. libfabric's data-path
 * calls are static inline functions behind function tables and its flags are
 * macros; this shim gives Swift plain functions and opaque handles instead.
 * Every function returns 0 / a count on success and a negative libfabric
 * error code (-FI_E*) on failure; efa_strerror() turns one into text. */
#ifndef EFA_SHIM_H
#define EFA_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/** One RDM+RMA domain a provider offers. */
typedef struct efa_domain_info {
    char provider[64];
    char fabric[128];
    char domain[128];
    uint64_t mr_mode;        /**< the EFA_MR_* bits the provider will use */
    uint64_t max_msg_size;
    uint64_t tx_size;        /**< transmit queue depth */
    uint64_t inject_size;
} efa_domain_info;

/* mr_mode bits, mirrored from fi_domain.h so Swift needs no libfabric header. */
#define EFA_MR_LOCAL (1ULL << 2)
#define EFA_MR_VIRT_ADDR (1ULL << 4)
#define EFA_MR_ALLOCATED (1ULL << 5)
#define EFA_MR_PROV_KEY (1ULL << 6)
#define EFA_MR_ENDPOINT (1ULL << 9)
#define EFA_MR_HMEM (1ULL << 10)

/** -FI_EAGAIN and -FI_ENODATA, the two codes the plugin branches on. */
int efa_err_again(void);
int efa_err_nodata(void);

/** "1.17.0": the libfabric library's own version. */
const char *efa_library_version(void);
/** libfabric's text for a (negative or positive) error code. */
const char *efa_strerror(int code);

/**
 * Lists the RDM endpoints with one-sided RMA that `provider` offers
 * (fi_getinfo with the EFA memory-registration hint set). `node` (may be NULL)
 * is a source address for IP-based providers. Returns the number found (all
 * of them, even beyond `capacity`) or a negative error code.
 */
int efa_list_domains(const char *provider, const char *node, efa_domain_info *out, size_t capacity);

/** An opened fabric + domain + address vector + completion queue + endpoint. */
typedef struct efa_context efa_context;

/** Opens the endpoint for one domain of `provider`. err gets a sentence on failure. */
int efa_open(const char *provider, const char *node, const char *domain, efa_context **out, char *err, size_t err_len);
/** Closes everything efa_open created. Memory regions must be closed first. */
void efa_close(efa_context *context);
/** The provider's answer for this domain. */
const efa_domain_info *efa_info(const efa_context *context);
/** The endpoint's address (fi_getname). *length: capacity in, size out. */
int efa_get_name(efa_context *context, uint8_t *out, size_t *length);

/** Registers [addr, addr+length) for local and remote read/write. requested_key is used when the provider lets the application pick keys. */
int efa_mr_reg(efa_context *context, void *addr, size_t length, uint64_t requested_key, void **mr, uint64_t *key, void **desc);
/** Closes a memory region from efa_mr_reg. */
int efa_mr_close(void *mr);

/** Inserts a peer address into the address vector; *fi_addr receives its handle. */
int efa_av_insert(efa_context *context, const uint8_t *addr, size_t length, uint64_t *fi_addr);
/** Removes a peer address. */
int efa_av_remove(efa_context *context, uint64_t fi_addr);

/** Posts one fi_write (is_write != 0) or fi_read. op_context must stay valid until its completion (64 bytes, FI_CONTEXT2). */
ssize_t efa_post(efa_context *context, int is_write, void *local, size_t length, void *desc, uint64_t peer,
                 uint64_t remote_addr, uint64_t key, void *op_context);

/** A failed operation read with fi_cq_readerr. */
typedef struct efa_failure {
    void *op_context;
    int error;        /**< positive FI_E* code */
    int prov_errno;
    char text[160];
} efa_failure;

/**
 * Reads up to capacity completions (their op contexts) and drives progress.
 * Returns the count, 0 when none, or -1 with *failure filled for one failed
 * operation, or another negative error code.
 */
ssize_t efa_cq_read(efa_context *context, void **op_contexts, size_t capacity, efa_failure *failure);

/** Whether the completion queue has a file descriptor to sleep on. */
int efa_can_wait(const efa_context *context);
/**
 * Whether the caller may sleep now (fi_trywait: no completion or progress is
 * pending). A libfabric call: serialise it with the other calls on the context.
 */
int efa_try_wait(efa_context *context);
/**
 * Sleeps until the completion queue's fd fires or efa_wake is called, at most
 * timeout_ms. Needs no serialisation. Returns 0 or a negative errno.
 */
int efa_sleep(efa_context *context, int timeout_ms);
/** Wakes a thread sleeping in efa_sleep. */
void efa_wake(efa_context *context);
#endif
