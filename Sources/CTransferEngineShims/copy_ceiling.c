/* The memory-copy ceiling's second method: a copy whose stores bypass the cache. A transport that
 * copies large blocks that way (the shm plugin does) is not held to glibc memcpy's figure, which
 * reads each destination line before writing it. */
#include <string.h>
#include "te_shims.h"

#if defined(__x86_64__)
#include <immintrin.h>

/* 64-byte blocks, 32-byte non-temporal stores (destination 32-byte aligned). */
__attribute__((target("avx2"))) static size_t blocks_avx2(unsigned char *to, const unsigned char *from, size_t length) {
    size_t done = 0;
    for (; length - done >= 64; done += 64) {
        _mm256_stream_si256((__m256i *)(to + done), _mm256_loadu_si256((const __m256i *)(from + done)));
        _mm256_stream_si256((__m256i *)(to + done + 32), _mm256_loadu_si256((const __m256i *)(from + done + 32)));
    }
    return done;
}

/* The same with 16-byte stores, which every x86-64 has. */
static size_t blocks_sse2(unsigned char *to, const unsigned char *from, size_t length) {
    size_t done = 0;
    for (; length - done >= 64; done += 64) {
        for (int lane = 0; lane < 64; lane += 16) {
            _mm_stream_si128((__m128i *)(to + done + lane), _mm_loadu_si128((const __m128i *)(from + done + lane)));
        }
    }
    return done;
}

void te_copy_bypassing_cache(void *destination, const void *source, size_t length) {
    unsigned char *to = destination;
    const unsigned char *from = source;
    size_t lead = (size_t)(-(uintptr_t)to & 63);
    if (lead > length) lead = length;
    memcpy(to, from, lead);
    to += lead; from += lead; length -= lead;
    size_t done = __builtin_cpu_supports("avx2") ? blocks_avx2(to, from, length) : blocks_sse2(to, from, length);
    _mm_sfence();
    memcpy(to + done, from + done, length - done);
}
#else
void te_copy_bypassing_cache(void *destination, const void *source, size_t length) { memcpy(destination, source, length); }
#endif
