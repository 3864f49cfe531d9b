#define _GNU_SOURCE
#include "te_shims.h"
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

int te_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

void te_set_thread_name(const char *name) {
    char buffer[16];
    strncpy(buffer, name, sizeof buffer - 1);
    buffer[sizeof buffer - 1] = 0;
    pthread_setname_np(pthread_self(), buffer);
}

int te_thread_id(void) { return (int)syscall(SYS_gettid); }

void te_thread_name(char *buffer, size_t capacity) {
    if (!buffer || capacity == 0) return;
    if (pthread_getname_np(pthread_self(), buffer, capacity) != 0) buffer[0] = 0;
}

const char *te_image_path(const void *addr) {
    Dl_info info;
    if (dladdr(addr, &info) == 0) return NULL;
    return info.dli_fname;
}

void te_consume(void *pointer) {
    /* An opaque use: the caller's compiler must assume the bytes behind pointer are read and may have changed. */
    __asm__ volatile("" : : "r"(pointer) : "memory");
}
