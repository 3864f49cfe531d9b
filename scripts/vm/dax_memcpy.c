/* Raw reference for the cxl benchmark (runs in the guest): memcpy between heap memory and a
 * device-dax mapping, per block size, three rounds of about half a second each (at least one copy);
 * a ceiling is the best of them, since emulation speed swings. Every copy of a case moves the same
 * block (the heap at offset 0, the mapping at 2 MiB), as the benchmark's one-request cases copy the
 * same block each time: cycling over the whole heap left the heap side colder than the engine's, and
 * its 1 MiB read ran about 3% over this ceiling. The device's first 2 MiB chunk holds the cxl
 * plugin's allocation table, which these copies leave alone. Block sizes after the device path
 * pick the cases (at most 8; default 4096, 1 MiB and 64 MiB), so a benchmark can sample the ceiling
 * right beside each of its cases. Prints "memcpy <op> <bytes> <GB/s>". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "/dev/dax0.0";
    size_t length = 128u << 20, align = 2u << 20, table = 2u << 20;
    int fd = open(path, O_RDWR);
    if (fd < 0) { perror(path); return 1; }
    char *reserve = mmap(NULL, length + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *pool = mmap((void *)(((uintptr_t)reserve + align - 1) & ~(uintptr_t)(align - 1)), length, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_FIXED, fd, 0);
    if (pool == MAP_FAILED) { perror("mmap"); return 1; }
    char *heap = aligned_alloc(4096, length);
    memset(heap, 7, length);
    size_t sizes[8] = { 4096, 1u << 20, 64u << 20 };
    int count = 3;
    if (argc > 2) {
        count = 0;
        if (argc - 2 > 8) { fprintf(stderr, "at most 8 block sizes\n"); return 2; }
        for (int i = 2; i < argc; i++) {
            char *end;
            unsigned long long size = strtoull(argv[i], &end, 10);
            if (*end != 0 || size == 0 || size > length - table) { fprintf(stderr, "bad block size %s (1..%zu bytes)\n", argv[i], length - table); return 2; }
            sizes[count++] = size;
        }
    }
    double best[2][8] = { { 0 } };
    /* With several cases the rounds go over every case in turn, so a slow stretch of the emulation
     * lowers one round of several cases rather than all three rounds of one case. */
    for (int round = 0; round < 3; round++) {
        for (int op = 0; op < 2; op++) {
            for (int s = 0; s < count; s++) {
                size_t size = sizes[s], done = 0;
                double start = now();
                while (done == 0 || now() - start < 0.5) {
                    if (op == 0) memcpy(pool + table, heap, size); else memcpy(heap, pool + table, size);
                    __asm__ volatile("" : : : "memory"); /* the copies must happen: nothing reads them afterwards */
                    __builtin_ia32_sfence();
                    done++;
                }
                double rate = (double)done * size / (now() - start) / 1e9;
                if (rate > best[op][s]) best[op][s] = rate;
            }
        }
    }
    for (int op = 0; op < 2; op++)
        for (int s = 0; s < count; s++) printf("memcpy %s %zu %.6f\n", op == 0 ? "write" : "read", sizes[s], best[op][s]);
    return 0;
}
