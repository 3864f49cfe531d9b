/* Cross-memory attach (process_vm_readv/writev) for the shm plugin: GNU extensions
 * that Swift's Glibc module does not expose. */
#ifndef SHM_SHIM_H
#define SHM_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/** Copies length bytes from local_addr into pid's remote_addr; returns bytes moved or -errno. */
int64_t shm_write_to(pid_t pid, uint64_t local_addr, uint64_t remote_addr, uint64_t length);
/** Copies length bytes from pid's remote_addr into local_addr; returns bytes moved or -errno. */
int64_t shm_read_from(pid_t pid, uint64_t local_addr, uint64_t remote_addr, uint64_t length);
/** Allows any process of this user to attach (prctl PR_SET_PTRACER_ANY; a no-op without Yama). */
void shm_allow_attach(void);
/** This process's pid. */
pid_t shm_getpid(void);
/** A memfd of length bytes mapped shared read-write: *fd, *addr and the memfd's *inode. Returns 0 or -errno. */
int shm_memfd_alloc(uint64_t length, int *fd, void **addr, uint64_t *inode);
/**
 * Maps length bytes of pid's descriptor fd (through /proc/pid/fd, which the kernel allows where
 * ptrace would be allowed) after checking it is still the file with `inode`; -ESTALE if not.
 */
int shm_map_peer(pid_t pid, int fd, uint64_t length, uint64_t inode, void **addr);
/** munmap; 0 or -errno. */
int shm_unmap(void *addr, uint64_t length);
/** close; 0 or -errno. */
int shm_close(int fd);
/** pidfd_open(pid): the fd or -errno. */
int shm_pidfd_open(pid_t pid);
/** 1 once the process behind pidfd has exited, else 0 (never blocks). */
int shm_pidfd_exited(int pidfd);
/** memcpy. */
void shm_copy(void *destination, const void *source, uint64_t length);
/**
 * A copy with non-temporal (cache-bypassing) stores on x86-64 (AVX2 when the CPU has it, else
 * SSE2), memcpy elsewhere: for blocks larger than the cache, where ordinary stores first read
 * every destination line and evict the source. Stores are fenced before it returns.
 */
void shm_copy_streaming(void *destination, const void *source, uint64_t length);
/* Access words of registered buffers, in a memfd peers map: generation in bits 63..32,
 * bit 31 = exposed, bits 30..0 = peers' copies in flight. */
/** Counts a copy in if the word is exposed at generation gen. Returns 1 when pinned, else 0. (Inline: on every copy.) */
static inline int shm_slot_pin(uint64_t *word, uint32_t gen) {
    uint64_t value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    for (;;) {
        if ((uint32_t)(value >> 32) != gen || !(value & 0x80000000u) || (value & 0x7fffffffu) == 0x7fffffffu) return 0;
        if (__atomic_compare_exchange_n(word, &value, value + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return 1;
    }
}
/** Counts a copy out, if the word is still at generation gen. */
static inline void shm_slot_unpin(uint64_t *word, uint32_t gen) {
    uint64_t value = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    while ((uint32_t)(value >> 32) == gen && (value & 0x7fffffffu))
        if (__atomic_compare_exchange_n(word, &value, value - 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return;
}
/** Clears the exposed bit; returns the copies in flight. */
uint32_t shm_slot_conceal(uint64_t *word);
/** Atomic load and store. */
uint64_t shm_slot_load(const uint64_t *word);
void shm_slot_store(uint64_t *word, uint64_t value);
#endif
