/* One runtime's implementation of the gpu_* calls (see gpu_shim.h). */
#ifndef GPU_BACKEND_H
#define GPU_BACKEND_H
#include "gpu_shim.h"

typedef struct gpu_backend {
    int (*load)(const char *library, char *error, size_t error_capacity);
    int (*driver_version)(int *version);
    int (*device_count)(int *count);
    int (*fabric_supported)(int ordinal, int *supported);
    int (*bind_device)(int ordinal);
    int (*pointer_info)(uint64_t addr, int *is_device, int *device, uint64_t *base, uint64_t *size);
    int (*ipc_export)(uint64_t base, uint8_t handle[GPU_HANDLE_BYTES]);
    int (*ipc_open)(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t *addr);
    int (*ipc_close)(uint64_t addr);
    int (*fabric_export)(uint64_t addr, uint8_t handle[GPU_HANDLE_BYTES]);
    int (*fabric_import)(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t size, int ordinal, uint64_t *addr);
    int (*fabric_unmap)(uint64_t addr, uint64_t size);
    int (*fabric_alloc)(int ordinal, uint64_t size, uint64_t *addr, uint64_t *rounded);
    int (*alloc)(uint64_t size, uint64_t *addr);
    int (*free)(uint64_t addr);
    int (*copy)(uint64_t destination, uint64_t source, uint64_t length);
    const char *(*error_name)(int result);
    int (*has_fabric)(void);
} gpu_backend;

/** One entry point a runtime binds: where its address goes, and its name. */
typedef struct gpu_symbol {
    void **slot;
    const char *symbol;
} gpu_symbol;

/**
 * Fills every slot of `table` from `handle` (dlsym). On the first missing symbol writes
 * "<library> has no <symbol><hint>" into error and returns -2; 0 when all were found.
 */
int gpu_bind_symbols(void *handle, const gpu_symbol *table, size_t count, const char *library, const char *hint,
                     char *error, size_t capacity);

extern const gpu_backend gpu_cuda_backend;
/** NULL when built without HIP's headers. */
extern const gpu_backend *const gpu_hip_backend;

#endif
