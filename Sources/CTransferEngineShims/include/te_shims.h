/* GNU extensions the Swift Glibc module does not expose (it is built without _GNU_SOURCE). */
#ifndef TE_SHIMS_H
#define TE_SHIMS_H
#include <stddef.h>
#include <stdint.h>

/** accept4(fd, NULL, NULL, SOCK_CLOEXEC). */
int te_accept_cloexec(int fd);
/** Names the calling thread (best effort, truncated to 15 bytes). */
void te_set_thread_name(const char *name);
/** The calling thread's kernel id (gettid). */
int te_thread_id(void);
/** The calling thread's name into buffer (NUL-terminated; "" when unnamed or on error). */
void te_thread_name(char *buffer, size_t capacity);
/** Path of the ELF image (executable or shared library) that contains addr, or NULL. */
const char *te_image_path(const void *addr);
/** Does nothing, opaquely: the compiler must assume the bytes at `pointer` are read and may have changed (keeps benchmark copies real). */
void te_consume(void *pointer);

/** memcpy with non-temporal (cache-bypassing) stores where the CPU has them (x86-64), else memcpy. */
void te_copy_bypassing_cache(void *destination, const void *source, size_t length);

#endif
