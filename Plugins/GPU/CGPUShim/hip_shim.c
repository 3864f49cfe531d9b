/* HIP (ROCm) behind the gpu_* calls, bound with dlopen so one build serves
 * Debian's HIP 5 (libamdhip64.so.5) and ROCm 6 (libamdhip64.so.6). The entry
 * points are typed from Debian's hip_runtime_api.h (libamdhip64-dev), so a
 * mismatch is a compile error; without the header (TE_HAVE_HIP_HEADERS=0, decided by
 * Package.swift) the hip backend is left out. */
#define _GNU_SOURCE
#include "gpu_backend.h"

#if TE_HAVE_HIP_HEADERS /* set by Package.swift from the header's presence */
#define __HIP_PLATFORM_AMD__ 1
#include <hip/hip_runtime_api.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

static struct {
    __typeof__(&hipGetDeviceCount) getDeviceCount;
    __typeof__(&hipDriverGetVersion) driverGetVersion;
    __typeof__(&hipSetDevice) setDevice;
    __typeof__(&hipPointerGetAttributes) pointerGetAttributes;
    __typeof__(&hipMemGetAddressRange) memGetAddressRange;
    __typeof__(&hipIpcGetMemHandle) ipcGetMemHandle;
    __typeof__(&hipIpcOpenMemHandle) ipcOpenMemHandle;
    __typeof__(&hipIpcCloseMemHandle) ipcCloseMemHandle;
    __typeof__(&hipMalloc) malloc;
    __typeof__(&hipFree) free;
    __typeof__(&hipMemcpy) memcpy;
    __typeof__(&hipGetErrorName) getErrorName;
    __typeof__(&hipDeviceCanAccessPeer) deviceCanAccessPeer;
    __typeof__(&hipDeviceEnablePeerAccess) deviceEnablePeerAccess;
    __typeof__(&hipGetLastError) getLastError;
} hip;

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int load_state = 1; /* 0 once loaded; otherwise the result of the last attempt */

static const char *hip_error_name(int result) {
    static __thread char text[32];
    if (hip.getErrorName) return hip.getErrorName((hipError_t)result);
    snprintf(text, sizeof text, "hipError_t %d", result);
    return text;
}

static int hip_load(const char *library, char *error, size_t capacity) {
    pthread_mutex_lock(&load_lock);
    /* Only success is final: a failed load is tried again (another library may be named, or the
     * driver installed since), so the answer always describes the library asked for now. */
    if (load_state == 0) {
        pthread_mutex_unlock(&load_lock);
        return 0;
    }
    void *handle = NULL;
    if (library && *library) {
        handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
    } else {
        handle = dlopen("libamdhip64.so.6", RTLD_NOW | RTLD_LOCAL);
        if (!handle) handle = dlopen("libamdhip64.so.5", RTLD_NOW | RTLD_LOCAL);
    }
    if (!handle) {
        if (error && capacity) snprintf(error, capacity, "%s", dlerror());
        load_state = -1;
        pthread_mutex_unlock(&load_lock);
        return -1;
    }
    const gpu_symbol table[] = {
        {(void **)&hip.getDeviceCount, "hipGetDeviceCount"},
        {(void **)&hip.driverGetVersion, "hipDriverGetVersion"},
        {(void **)&hip.setDevice, "hipSetDevice"},
        {(void **)&hip.pointerGetAttributes, "hipPointerGetAttributes"},
        {(void **)&hip.memGetAddressRange, "hipMemGetAddressRange"},
        {(void **)&hip.ipcGetMemHandle, "hipIpcGetMemHandle"},
        {(void **)&hip.ipcOpenMemHandle, "hipIpcOpenMemHandle"},
        {(void **)&hip.ipcCloseMemHandle, "hipIpcCloseMemHandle"},
        {(void **)&hip.malloc, "hipMalloc"},
        {(void **)&hip.free, "hipFree"},
        {(void **)&hip.memcpy, "hipMemcpy"},
        {(void **)&hip.getErrorName, "hipGetErrorName"},
        {(void **)&hip.deviceCanAccessPeer, "hipDeviceCanAccessPeer"},
        {(void **)&hip.deviceEnablePeerAccess, "hipDeviceEnablePeerAccess"},
        {(void **)&hip.getLastError, "hipGetLastError"},
    };
    if (gpu_bind_symbols(handle, table, sizeof table / sizeof table[0], "libamdhip64", "", error, capacity) != 0) {
        memset(&hip, 0, sizeof hip);
        load_state = -2;
        pthread_mutex_unlock(&load_lock);
        return -2;
    }
    /* HIP has no separate init: counting devices initialises it (hipErrorNoDevice = 100 without a GPU). */
    int count = 0;
    load_state = hip.getDeviceCount(&count);
    if (load_state == 0 && count == 0) load_state = hipErrorNoDevice;
    if (load_state != 0 && error && capacity) snprintf(error, capacity, "hipGetDeviceCount: %s", hip_error_name(load_state));
    pthread_mutex_unlock(&load_lock);
    return load_state;
}

static int hip_driver_version(int *version) { return hip.driverGetVersion(version); }
static int hip_device_count(int *count) { return hip.getDeviceCount(count); }
static int hip_fabric_supported(int ordinal, int *supported) { (void)ordinal; *supported = 0; return 0; }

/* HIP's IPC open has no lazy peer-access flag that does anything (hipIpcMemLazyEnablePeerAccess
 * is 0): a copy between a mapping of another GPU's memory and ours needs peer access enabled from
 * our device, once per process. */
static void enable_peer_access(int ordinal) {
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static unsigned long long done = 0; /* bit per device already set up */
    pthread_mutex_lock(&lock);
    if (ordinal < 64 && !(done & (1ULL << ordinal))) {
        int count = 0;
        hip.getDeviceCount(&count);
        for (int peer = 0; peer < count; peer++) {
            int can = 0;
            if (peer == ordinal || hip.deviceCanAccessPeer(&can, ordinal, peer) != hipSuccess || !can) continue;
            if (hip.deviceEnablePeerAccess(peer, 0) != hipSuccess) (void)hip.getLastError(); /* already enabled is fine */
        }
        done |= 1ULL << ordinal;
    }
    pthread_mutex_unlock(&lock);
}

static int hip_bind_device(int ordinal) {
    static __thread int bound = -1;
    if (bound == ordinal) return 0;
    int r = hip.setDevice(ordinal);
    if (!r) {
        bound = ordinal;
        enable_peer_access(ordinal);
    }
    return r;
}

static int hip_pointer_info(uint64_t addr, int *is_device, int *device, uint64_t *base, uint64_t *size) {
    hipPointerAttribute_t attributes;
    memset(&attributes, 0, sizeof attributes);
    *is_device = 0;
    /* Host memory HIP never saw answers hipErrorInvalidValue: it is host memory. */
    if (hip.pointerGetAttributes(&attributes, (const void *)(uintptr_t)addr) != hipSuccess || attributes.memoryType != hipMemoryTypeDevice) return 0;
    *is_device = 1;
    *device = attributes.device;
    hipDeviceptr_t start = 0;
    size_t length = 0;
    int r = hip.memGetAddressRange(&start, &length, (hipDeviceptr_t)(uintptr_t)addr);
    *base = (uint64_t)(uintptr_t)start;
    *size = length;
    return r;
}

static int hip_ipc_export(uint64_t base, uint8_t handle[GPU_HANDLE_BYTES]) {
    hipIpcMemHandle_t h;
    int r = hip.ipcGetMemHandle(&h, (void *)(uintptr_t)base);
    if (!r) memcpy(handle, &h, sizeof h);
    return r;
}

static int hip_ipc_open(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t *addr) {
    hipIpcMemHandle_t h;
    memcpy(&h, handle, sizeof h);
    void *mapped = NULL;
    int r = hip.ipcOpenMemHandle(&mapped, h, hipIpcMemLazyEnablePeerAccess);
    *addr = (uint64_t)(uintptr_t)mapped;
    return r;
}

static int hip_ipc_close(uint64_t addr) { return hip.ipcCloseMemHandle((void *)(uintptr_t)addr); }
static int hip_not_supported(void) { return hipErrorNotSupported; }
static int hip_fabric_export(uint64_t addr, uint8_t handle[GPU_HANDLE_BYTES]) { (void)addr; (void)handle; return hip_not_supported(); }
static int hip_fabric_import(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t size, int ordinal, uint64_t *addr) {
    (void)handle; (void)size; (void)ordinal; (void)addr;
    return hip_not_supported();
}
static int hip_fabric_unmap(uint64_t addr, uint64_t size) { (void)addr; (void)size; return hip_not_supported(); }
static int hip_fabric_alloc(int ordinal, uint64_t size, uint64_t *addr, uint64_t *rounded) {
    (void)ordinal; (void)size; (void)addr; (void)rounded;
    return hip_not_supported();
}

static int hip_alloc(uint64_t size, uint64_t *addr) {
    void *p = NULL;
    int r = hip.malloc(&p, size);
    *addr = (uint64_t)(uintptr_t)p;
    return r;
}

static int hip_free(uint64_t addr) { return hip.free((void *)(uintptr_t)addr); }
static int hip_copy(uint64_t destination, uint64_t source, uint64_t length) {
    return hip.memcpy((void *)(uintptr_t)destination, (const void *)(uintptr_t)source, length, hipMemcpyDefault);
}
static int hip_has_fabric(void) { return 0; }

static const gpu_backend backend = {
    hip_load, hip_driver_version, hip_device_count, hip_fabric_supported, hip_bind_device, hip_pointer_info,
    hip_ipc_export, hip_ipc_open, hip_ipc_close, hip_fabric_export, hip_fabric_import, hip_fabric_unmap,
    hip_fabric_alloc, hip_alloc, hip_free, hip_copy, hip_error_name, hip_has_fabric,
};
const gpu_backend *const gpu_hip_backend = &backend;
#else
const gpu_backend *const gpu_hip_backend = NULL;
#endif
