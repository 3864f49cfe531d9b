#define _GNU_SOURCE
#include <stdio.h>
#include "shm_shim.h"
#include <errno.h>
#include <sys/uio.h>
#include <sys/prctl.h>
#include <unistd.h>

/* process_vm_* may move fewer bytes than asked (page boundaries, signals): loop. */
static int64_t transfer(pid_t pid, uint64_t local, uint64_t remote, uint64_t length, int write) {
    uint64_t done = 0;
    while (done < length) {
        struct iovec l = { (void *)(uintptr_t)(local + done), (size_t)(length - done) };
        struct iovec r = { (void *)(uintptr_t)(remote + done), (size_t)(length - done) };
        ssize_t n = write ? process_vm_writev(pid, &l, 1, &r, 1, 0) : process_vm_readv(pid, &l, 1, &r, 1, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (n == 0) return -EFAULT;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

int64_t shm_write_to(pid_t pid, uint64_t local_addr, uint64_t remote_addr, uint64_t length) {
    return transfer(pid, local_addr, remote_addr, length, 1);
}

int64_t shm_read_from(pid_t pid, uint64_t local_addr, uint64_t remote_addr, uint64_t length) {
    return transfer(pid, local_addr, remote_addr, length, 0);
}

pid_t shm_getpid(void) { return getpid(); }

/* Peers read and write our registered memory with process_vm_*, which needs ptrace access.
 * Under Yama's ptrace_scope 1 a process must name its tracer, and the kernel keeps one name
 * only, so with several peers it has to be "any" (same user still required). Under scope 0
 * nothing is needed and nothing is widened; under 2 and 3 attach is impossible either way. */
void shm_allow_attach(void) {
#ifdef PR_SET_PTRACER
    FILE *f = fopen("/proc/sys/kernel/yama/ptrace_scope", "r");
    int scope = 0;
    if (f) { if (fscanf(f, "%d", &scope) != 1) scope = 0; fclose(f); }
    if (scope == 1) prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0);
#endif
}

#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>

int shm_memfd_alloc(uint64_t length, int *fd, void **addr, uint64_t *inode) {
    int f = memfd_create("transfer-engine-buffer", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (f < 0) return -errno;
    struct stat st;
    /* Sealed against shrinking: a peer's mapping then never loses pages under it (SIGBUS). */
    if (ftruncate(f, (off_t)length) != 0 || fcntl(f, F_ADD_SEALS, F_SEAL_SHRINK) != 0 || fstat(f, &st) != 0) {
        int err = errno;
        close(f);
        return -err;
    }
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        close(f);
        return -err;
    }
    *fd = f;
    *addr = p;
    *inode = (uint64_t)st.st_ino;
    return 0;
}

int shm_map_peer(pid_t pid, int fd, uint64_t length, uint64_t inode, void **addr) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/fd/%d", (int)pid, fd);
    int f = open(path, O_RDWR | O_CLOEXEC);
    if (f < 0) return -errno;
    struct stat st;
    if (fstat(f, &st) != 0 || (uint64_t)st.st_ino != inode || (uint64_t)st.st_size < length) {
        close(f);
        return -ESTALE; /* not the memory the peer published (the descriptor is stale) */
    }
    /* Only a memfd sealed against shrinking: a peer that truncated an unsealed one under our
     * mapping would turn our next copy into SIGBUS. Unsealed memory goes through process_vm_*. */
    int seals = fcntl(f, F_GET_SEALS);
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
        close(f);
        return -EPERM;
    }
    /* Not populated: MAP_POPULATE would fault in (and so allocate) the peer's whole buffer at the
     * first transfer, while holding the plugin's lock (31 ms for 512 MiB here; a peer publishing a
     * huge sparse memfd could exhaust memory). Pages fault in as copies touch them. */
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
    int err = errno;
    close(f);
    if (p == MAP_FAILED) return -err;
    *addr = p;
    return 0;
}

int shm_unmap(void *addr, uint64_t length) { return munmap(addr, length) == 0 ? 0 : -errno; }
int shm_close(int fd) { return close(fd) == 0 ? 0 : -errno; }

int shm_pidfd_open(pid_t pid) {
    long fd = syscall(SYS_pidfd_open, pid, 0);
    return fd < 0 ? -errno : (int)fd;
}

int shm_pidfd_exited(int pidfd) {
    struct pollfd p = { pidfd, POLLIN, 0 };
    return poll(&p, 1, 0) > 0 ? 1 : 0; /* readable once the process has exited */
}

void shm_copy(void *destination, const void *source, uint64_t length) { memcpy(destination, source, length); }

#if defined(__x86_64__)
#include <immintrin.h>

/* Copies whole 64-byte lines with non-temporal stores; destination 32-byte aligned. */
__attribute__((target("avx2"))) static void stream_lines_avx2(char *d, const char *s, uint64_t lines) {
    for (uint64_t i = 0; i < lines; i++, d += 64, s += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)s), b = _mm256_loadu_si256((const __m256i *)(s + 32));
        _mm256_stream_si256((__m256i *)d, a);
        _mm256_stream_si256((__m256i *)(d + 32), b);
    }
}

/* The same with SSE2, which every x86-64 has; destination 16-byte aligned. */
static void stream_lines_sse2(char *d, const char *s, uint64_t lines) {
    for (uint64_t i = 0; i < lines; i++, d += 64, s += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)s), b = _mm_loadu_si128((const __m128i *)(s + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + 32)), e = _mm_loadu_si128((const __m128i *)(s + 48));
        _mm_stream_si128((__m128i *)d, a);
        _mm_stream_si128((__m128i *)(d + 16), b);
        _mm_stream_si128((__m128i *)(d + 32), c);
        _mm_stream_si128((__m128i *)(d + 48), e);
    }
}

void shm_copy_streaming(void *destination, const void *source, uint64_t length) {
    char *d = destination;
    const char *s = source;
    /* Align the destination to a cache line with an ordinary copy, stream the lines, copy the tail. */
    uint64_t head = (64 - ((uintptr_t)d & 63)) & 63;
    if (head > length) head = length;
    memcpy(d, s, head);
    d += head; s += head; length -= head;
    uint64_t lines = length / 64;
    if (__builtin_cpu_supports("avx2")) stream_lines_avx2(d, s, lines); else stream_lines_sse2(d, s, lines);
    _mm_sfence(); /* streaming stores are weakly ordered: make them visible before completion is reported */
    memcpy(d + lines * 64, s + lines * 64, length - lines * 64);
}
#else
void shm_copy_streaming(void *destination, const void *source, uint64_t length) { memcpy(destination, source, length); }
#endif



uint32_t shm_slot_conceal(uint64_t *word) {
    return (uint32_t)(__atomic_and_fetch(word, ~(uint64_t)0x80000000u, __ATOMIC_ACQ_REL) & 0x7fffffffu);
}

uint64_t shm_slot_load(const uint64_t *word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }

void shm_slot_store(uint64_t *word, uint64_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }
