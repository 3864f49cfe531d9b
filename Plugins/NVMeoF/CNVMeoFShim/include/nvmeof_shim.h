/* Thin C wrappers for the nvmeof plugin: NVMe-oF discovery, connect and
 * disconnect through libnvme, and opening a namespace (block device or file)
 * for direct I/O with its size and logical block size. */
#ifndef NVMEOF_SHIM_H
#define NVMEOF_SHIM_H
#include <stddef.h>
#include <stdint.h>

/** One discovery log entry, as strings. */
typedef struct nvmeof_disc_entry {
    char trtype[16];   /**< "tcp", "rdma", "fc", "loop" */
    char traddr[256];
    char trsvcid[32];
    char subnqn[256];
    int subtype;       /**< 1: a referral to another discovery controller, 2: an NVM subsystem */
} nvmeof_disc_entry;

/** Whether the kernel's NVMe-oF host (/dev/nvme-fabrics) is there: 0 or -errno. */
int nvmeof_fabrics_available(void);

/**
 * Reads the discovery log of the discovery controller at trtype/traddr/trsvcid
 * (a temporary connection, always closed). Writes up to capacity entries and
 * returns how many the log has, or -errno. error gets libnvme's words.
 */
int nvmeof_discover(const char *trtype, const char *traddr, const char *trsvcid, const char *host_traddr,
                    nvmeof_disc_entry *out, size_t capacity, char *error, size_t error_capacity);

/** A controller this process connected (to be disconnected at close). */
typedef struct nvmeof_connection nvmeof_connection;

/**
 * Connects to subsystem nqn. *out is NULL and 0 is returned when the kernel
 * already had that controller (someone else owns it); name gets the
 * controller's sysfs name when known ("nvme0"). Returns 0 or -errno.
 */
int nvmeof_connect(const char *trtype, const char *traddr, const char *trsvcid, const char *host_traddr, const char *nqn,
                   nvmeof_connection **out, char *name, size_t name_capacity, char *error, size_t error_capacity);

/** Disconnects and frees a connection from nvmeof_connect. Returns 0 or -errno. */
int nvmeof_disconnect(nvmeof_connection *connection);

/**
 * Opens a namespace block device or file for reading and writing. With
 * direct != 0 it tries O_DIRECT first and reports in *is_direct whether it
 * got it (tmpfs files refuse it). *size: bytes; *block: the logical block
 * size (1 for a file opened without O_DIRECT); *identity: "b:<rdev>" for a
 * block device, "f:<dev>:<ino>" for a file. Returns the fd or -errno.
 */
int nvmeof_open(const char *path, int direct, uint64_t *size, uint32_t *block, int *is_direct,
                char *identity, size_t identity_capacity);

/** Same identity string as nvmeof_open for a path, without opening it for I/O. Returns 0 or -errno. */
int nvmeof_identity(const char *path, char *identity, size_t identity_capacity);

/** Full-length pread/pwrite (retrying short transfers and EINTR). Returns 0 or -errno (-EIO at end of device). */
int nvmeof_pread_full(int fd, void *buffer, uint64_t length, uint64_t offset);
int nvmeof_pwrite_full(int fd, const void *buffer, uint64_t length, uint64_t offset);

#endif
