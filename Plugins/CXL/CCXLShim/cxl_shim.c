#define _GNU_SOURCE
#include "cxl_shim.h"
#include <cxl/libcxl.h>
#include <daxctl/libdaxctl.h>
#include <emmintrin.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

int cxl_list_dax(cxl_dax_info *out, size_t capacity) {
    struct daxctl_ctx *ctx = NULL;
    int r = daxctl_new(&ctx);
    if (r < 0) return r;
    int count = 0;
    struct daxctl_region *region;
    daxctl_region_foreach(ctx, region) {
        struct daxctl_dev *dev;
        daxctl_dev_foreach(region, dev) {
            if ((size_t)count < capacity) {
                cxl_dax_info *info = &out[count];
                memset(info, 0, sizeof *info);
                snprintf(info->name, sizeof info->name, "%s", daxctl_dev_get_devname(dev));
                snprintf(info->region, sizeof info->region, "%s", daxctl_region_get_devname(region));
                info->size = daxctl_dev_get_size(dev);
                info->align = daxctl_dev_get_align(dev);
                info->enabled = daxctl_dev_is_enabled(dev);
            }
            count++;
        }
    }
    daxctl_unref(ctx);
    return count;
}

int cxl_list_memdevs(char *names, size_t names_length) {
    struct cxl_ctx *ctx = NULL;
    int r = cxl_new(&ctx);
    if (r < 0) return r;
    int count = 0;
    size_t used = 0;
    if (names_length) names[0] = 0;
    struct cxl_memdev *memdev;
    cxl_memdev_foreach(ctx, memdev) {
        const char *name = cxl_memdev_get_devname(memdev);
        if (used + strlen(name) + 2 < names_length)
            used += (size_t)snprintf(names + used, names_length - used, "%s%s", count ? "," : "", name);
        count++;
    }
    cxl_unref(ctx);
    return count;
}

int cxl_map(const char *path, uint64_t length, uint64_t align, int *fd_out, void **base_out) {
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) return -errno;
    if (align < 4096) align = 4096;
    /* Reserve length + align, then map the pool at an aligned address inside the reservation. */
    void *reserve = mmap(NULL, length + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (reserve == MAP_FAILED) { int e = errno; close(fd); return -e; }
    uintptr_t aligned = ((uintptr_t)reserve + align - 1) & ~(uintptr_t)(align - 1);
    void *base = mmap((void *)aligned, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, fd, 0);
    if (base == MAP_FAILED) { int e = errno; munmap(reserve, length + align); close(fd); return -e; }
    if (aligned > (uintptr_t)reserve) munmap(reserve, aligned - (uintptr_t)reserve);
    uintptr_t end = (uintptr_t)reserve + length + align;
    if (aligned + length < end) munmap((void *)(aligned + length), end - (aligned + length));
    *fd_out = fd;
    *base_out = base;
    return 0;
}

void cxl_unmap(int fd, void *base, uint64_t length) {
    if (base) munmap(base, length);
    if (fd >= 0) close(fd);
}

int64_t cxl_file_size(int fd) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    return st.st_size;
}

int cxl_file_identity(int fd, char *out, size_t length) {
    struct stat st;
    if (fstat(fd, &st) < 0) return -errno;
    if (S_ISCHR(st.st_mode)) snprintf(out, length, "chr:%u:%u", major(st.st_rdev), minor(st.st_rdev));
    else snprintf(out, length, "file:%llu:%llu", (unsigned long long)st.st_dev, (unsigned long long)st.st_ino);
    return 0;
}

void cxl_copy(void *dst, const void *src, uint64_t length, int flush) {
    memcpy(dst, src, length);
    if (flush) {
        uintptr_t line = (uintptr_t)dst & ~(uintptr_t)63, end = (uintptr_t)dst + length;
        for (; line < end; line += 64) _mm_clflush((const void *)line);
    }
    _mm_sfence();
}

void cxl_invalidate(const void *addr, uint64_t length) {
    uintptr_t line = (uintptr_t)addr & ~(uintptr_t)63, end = (uintptr_t)addr + length;
    for (; line < end; line += 64) _mm_clflush((const void *)line);
    _mm_mfence();
}

int cxl_claim(uint64_t *slot, uint64_t owner) {
    uint64_t expected = 0;
    return __atomic_compare_exchange_n(slot, &expected, owner, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

int cxl_release(uint64_t *slot, uint64_t owner) {
    uint64_t expected = owner;
    return __atomic_compare_exchange_n(slot, &expected, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}


int cxl_cas(uint64_t *slot, uint64_t expected, uint64_t desired) {
    return __atomic_compare_exchange_n(slot, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

void cxl_store(uint64_t *slot, uint64_t value) { __atomic_store_n(slot, value, __ATOMIC_RELEASE); }



uint32_t cxl_expose(uint64_t *access, int on) {
    uint64_t word = on ? __atomic_or_fetch(access, 1ull << 63, __ATOMIC_ACQ_REL)
                       : __atomic_and_fetch(access, ~(1ull << 63), __ATOMIC_ACQ_REL);
    return (uint32_t)(word & 0xffffffffu);
}

static int byte_lock(int fd, int command, short type, uint64_t offset, uint64_t count, struct flock *out) {
    struct flock lock;
    memset(&lock, 0, sizeof lock);
    lock.l_type = type;
    lock.l_whence = SEEK_SET;
    lock.l_start = (off_t)offset;
    lock.l_len = (off_t)count;
    if (fcntl(fd, command, &lock) < 0) return -errno;
    if (out) *out = lock;
    return 0;
}

int cxl_lock(int fd, uint64_t offset, int wait_ms) {
    for (int waited = 0;; waited++) {
        int r = byte_lock(fd, F_OFD_SETLK, F_WRLCK, offset, 1, NULL);
        if (r == 0 || (r != -EAGAIN && r != -EACCES) || waited >= wait_ms) return r == -EACCES ? -EAGAIN : r;
        usleep(1000);
    }
}

void cxl_unlock(int fd, uint64_t offset) { (void)byte_lock(fd, F_OFD_SETLK, F_UNLCK, offset, 1, NULL); }

int cxl_lock_held(int fd, uint64_t offset, uint64_t count) {
    struct flock lock;
    int r = byte_lock(fd, F_OFD_GETLK, F_WRLCK, offset, count, &lock);
    if (r < 0) return r;
    return lock.l_type != F_UNLCK;
}
