/* Thin C wrappers for the cxl plugin: device-dax discovery through libdaxctl,
 * CXL memory devices through libcxl, an aligned shared mapping, and the copy
 * with the fences (and optional cache-line flushes) that CXL memory needs. */
#ifndef CXL_SHIM_H
#define CXL_SHIM_H
#include <stddef.h>
#include <stdint.h>

/** A device-dax instance (e.g. dax0.0 backed by a CXL region). */
typedef struct cxl_dax_info {
    char name[64];        /**< "dax0.0" */
    char region[64];      /**< "region0" */
    uint64_t size;
    uint64_t align;
    int enabled;
} cxl_dax_info;

/** Lists device-dax devices (libdaxctl). Returns the count (all, even beyond capacity) or -errno. */
int cxl_list_dax(cxl_dax_info *out, size_t capacity);
/** Counts CXL memory devices (libcxl) and writes their names, comma-separated, into names. Returns the count or -errno. */
int cxl_list_memdevs(char *names, size_t names_length);

/**
 * Opens path read-write and maps length bytes MAP_SHARED at an address aligned
 * to align (device-dax refuses other alignments). *fd and *base receive the
 * descriptor and mapping. Returns 0 or -errno.
 */
int cxl_map(const char *path, uint64_t length, uint64_t align, int *fd, void **base);
/** Unmaps and closes. */
void cxl_unmap(int fd, void *base, uint64_t length);
/** Size of an open file or device (st_size; device-dax reports 0, use sysfs). */
int64_t cxl_file_size(int fd);
/** "dev:ino" of an open file, or "major:minor" of a character device: the pool's identity on this host. */
int cxl_file_identity(int fd, char *out, size_t length);

/** Copies length bytes and orders the stores (sfence); flush != 0 also writes the lines back (clflushopt-style) for non-coherent pools. */
void cxl_copy(void *dst, const void *src, uint64_t length, int flush);
/** Drops cached copies of [addr, addr+length) so the next read sees another host's writes (non-coherent pools). */
void cxl_invalidate(const void *addr, uint64_t length);
/** Atomically sets *slot from 0 to owner (the pool's chunk table is shared by every engine). Returns 1 on success. */
int cxl_claim(uint64_t *slot, uint64_t owner);
/** Atomically sets *slot from owner back to 0. Returns 1 on success. */
int cxl_release(uint64_t *slot, uint64_t owner);
/** Atomically replaces expected by desired. Returns 1 on success. */
int cxl_cas(uint64_t *slot, uint64_t expected, uint64_t desired);
/** Atomic store (release). */
void cxl_store(uint64_t *slot, uint64_t value);
/** Atomic load. */
static inline uint64_t cxl_load(const uint64_t *slot) { return __atomic_load_n(slot, __ATOMIC_ACQUIRE); }

/* The pool table's access words: bit 63 = exposed by its owner, low 32 bits = copies in flight. */
/** Counts a copy in if the word is exposed. Returns 1 when pinned, 0 when not exposed. (Inline: on every copy.) */
static inline int cxl_pin(uint64_t *access) {
    uint64_t word = __atomic_load_n(access, __ATOMIC_ACQUIRE);
    for (;;) {
        if (!(word >> 63) || (word & 0xffffffffu) == 0xffffffffu) return 0;
        if (__atomic_compare_exchange_n(access, &word, word + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return 1;
    }
}
/** Counts a copy out (never below zero). */
static inline void cxl_unpin(uint64_t *access) {
    uint64_t word = __atomic_load_n(access, __ATOMIC_ACQUIRE);
    while (word & 0xffffffffu)
        if (__atomic_compare_exchange_n(access, &word, word - 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
}
/** Sets (on != 0) or clears the exposed bit; returns the copies in flight afterwards. */
uint32_t cxl_expose(uint64_t *access, int on);

/* Open-file-description locks on single bytes of the pool's file or device: who holds one is
 * known to the kernel of this host in every pid namespace, and a lock dies with its holder. */
/** Takes a write lock on byte offset; waits up to wait_ms (0: try once). Returns 0 or -errno (-EAGAIN: held). */
int cxl_lock(int fd, uint64_t offset, int wait_ms);
/** Releases the lock on byte offset. */
void cxl_unlock(int fd, uint64_t offset);
/** Whether another open description holds a lock on a byte of [offset, offset+count): 1, 0, or -errno. */
int cxl_lock_held(int fd, uint64_t offset, uint64_t count);
#endif
