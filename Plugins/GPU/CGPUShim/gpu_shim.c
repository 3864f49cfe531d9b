#include "gpu_shim.h"

#include "gpu_backend.h"

#include <dlfcn.h>
#include <stdio.h>

static const gpu_backend *runtime = &gpu_cuda_backend;

int gpu_use(int which) {
    if (which == GPU_RUNTIME_HIP) {
        if (!gpu_hip_backend) return -1;
        runtime = gpu_hip_backend;
    } else {
        runtime = &gpu_cuda_backend;
    }
    return 0;
}

int gpu_load(const char *library, char *error, size_t capacity) { return runtime->load(library, error, capacity); }
int gpu_driver_version(int *version) { return runtime->driver_version(version); }
int gpu_device_count(int *count) { return runtime->device_count(count); }
int gpu_fabric_supported(int ordinal, int *supported) { return runtime->fabric_supported(ordinal, supported); }
int gpu_bind_device(int ordinal) { return runtime->bind_device(ordinal); }
int gpu_pointer_info(uint64_t addr, int *is_device, int *device, uint64_t *base, uint64_t *size) {
    return runtime->pointer_info(addr, is_device, device, base, size);
}
int gpu_ipc_export(uint64_t base, uint8_t handle[GPU_HANDLE_BYTES]) { return runtime->ipc_export(base, handle); }
int gpu_ipc_open(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t *addr) { return runtime->ipc_open(handle, addr); }
int gpu_ipc_close(uint64_t addr) { return runtime->ipc_close(addr); }
int gpu_fabric_export(uint64_t addr, uint8_t handle[GPU_HANDLE_BYTES]) { return runtime->fabric_export(addr, handle); }
int gpu_fabric_import(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t size, int ordinal, uint64_t *addr) {
    return runtime->fabric_import(handle, size, ordinal, addr);
}
int gpu_fabric_unmap(uint64_t addr, uint64_t size) { return runtime->fabric_unmap(addr, size); }
int gpu_fabric_alloc(int ordinal, uint64_t size, uint64_t *addr, uint64_t *rounded) { return runtime->fabric_alloc(ordinal, size, addr, rounded); }
int gpu_alloc(uint64_t size, uint64_t *addr) { return runtime->alloc(size, addr); }
int gpu_free(uint64_t addr) { return runtime->free(addr); }
int gpu_copy(uint64_t destination, uint64_t source, uint64_t length) { return runtime->copy(destination, source, length); }
const char *gpu_error_name(int result) { return runtime->error_name(result); }
int gpu_has_fabric(void) { return runtime->has_fabric(); }

int gpu_bind_symbols(void *handle, const gpu_symbol *table, size_t count, const char *library, const char *hint,
                     char *error, size_t capacity) {
    for (size_t i = 0; i < count; i++) {
        *table[i].slot = dlsym(handle, table[i].symbol);
        if (!*table[i].slot) {
            if (error && capacity) snprintf(error, capacity, "%s has no %s%s", library, table[i].symbol, hint);
            return -2;
        }
    }
    return 0;
}
