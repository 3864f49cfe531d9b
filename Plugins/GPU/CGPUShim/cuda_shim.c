#define _GNU_SOURCE
#include "gpu_shim.h"
#include "gpu_backend.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

/* Types and values from the CUDA 12 driver API (cuda.h), only what is used. */
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef struct CUctx_st *CUcontext;
typedef struct { char reserved[GPU_HANDLE_BYTES]; } CUipcMemHandle;
typedef struct { unsigned char data[GPU_HANDLE_BYTES]; } CUmemFabricHandle;
typedef struct { int type; int id; } CUmemLocation;
typedef struct {
    int type;                  /* CUmemAllocationType */
    int requestedHandleTypes;  /* CUmemAllocationHandleType */
    CUmemLocation location;
    void *win32HandleMetaData;
    struct { unsigned char compressionType, gpuDirectRDMACapable; unsigned short usage; unsigned char reserved[4]; } allocFlags;
} CUmemAllocationProp;
typedef struct { CUmemLocation location; int flags; } CUmemAccessDesc;

enum {
    CUDA_SUCCESS = 0,
    CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED = 128,
    CU_POINTER_ATTRIBUTE_MEMORY_TYPE = 2,
    CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9,
    CU_MEMORYTYPE_DEVICE = 2,
    CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1,
    CU_MEM_HANDLE_TYPE_FABRIC = 8,
    CU_MEM_ALLOCATION_TYPE_PINNED = 1,
    CU_MEM_LOCATION_TYPE_DEVICE = 1,
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3,
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0,
};

static struct {
    CUresult (*init)(unsigned);
    CUresult (*driverGetVersion)(int *);
    CUresult (*deviceGetCount)(int *);
    CUresult (*deviceGet)(CUdevice *, int);
    CUresult (*deviceGetAttribute)(int *, int, CUdevice);
    CUresult (*primaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*ctxSetCurrent)(CUcontext);
    CUresult (*pointerGetAttribute)(void *, int, CUdeviceptr);
    CUresult (*memGetAddressRange)(CUdeviceptr *, size_t *, CUdeviceptr);
    CUresult (*ipcGetMemHandle)(CUipcMemHandle *, CUdeviceptr);
    CUresult (*ipcOpenMemHandle)(CUdeviceptr *, CUipcMemHandle, unsigned);
    CUresult (*ipcCloseMemHandle)(CUdeviceptr);
    CUresult (*memRetainAllocationHandle)(CUmemGenericAllocationHandle *, void *);
    CUresult (*memExportToShareableHandle)(void *, CUmemGenericAllocationHandle, int, unsigned long long);
    CUresult (*memImportFromShareableHandle)(CUmemGenericAllocationHandle *, void *, int);
    CUresult (*memAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*memAddressFree)(CUdeviceptr, size_t);
    CUresult (*memMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*memUnmap)(CUdeviceptr, size_t);
    CUresult (*memSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*memCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
    CUresult (*memRelease)(CUmemGenericAllocationHandle);
    CUresult (*memGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
    CUresult (*memAlloc)(CUdeviceptr *, size_t);
    CUresult (*memFree)(CUdeviceptr);
    CUresult (*memcpy)(CUdeviceptr, CUdeviceptr, size_t);
    CUresult (*getErrorName)(CUresult, const char **);
} cu;

static const char *cuda_error_name(int result);

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static int load_state = 1; /* 0 once loaded; otherwise the result of the last attempt */

static int cuda_load(const char *library, char *error, size_t capacity) {
    pthread_mutex_lock(&load_lock);
    /* Only success is final: a failed load is tried again (another library may be named, or the
     * driver installed since), so the answer always describes the library asked for now. */
    if (load_state == 0) {
        pthread_mutex_unlock(&load_lock);
        return 0;
    }
    const char *name = library && *library ? library : "libcuda.so.1";
    void *handle = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        if (error && capacity) snprintf(error, capacity, "%s", dlerror());
        load_state = -1;
        pthread_mutex_unlock(&load_lock);
        return -1;
    }
    const gpu_symbol table[] = {
        {(void **)&cu.init, "cuInit"},
        {(void **)&cu.driverGetVersion, "cuDriverGetVersion"},
        {(void **)&cu.deviceGetCount, "cuDeviceGetCount"},
        {(void **)&cu.deviceGet, "cuDeviceGet"},
        {(void **)&cu.deviceGetAttribute, "cuDeviceGetAttribute"},
        {(void **)&cu.primaryCtxRetain, "cuDevicePrimaryCtxRetain"},
        {(void **)&cu.ctxSetCurrent, "cuCtxSetCurrent"},
        {(void **)&cu.pointerGetAttribute, "cuPointerGetAttribute"},
        {(void **)&cu.memGetAddressRange, "cuMemGetAddressRange_v2"},
        {(void **)&cu.ipcGetMemHandle, "cuIpcGetMemHandle"},
        {(void **)&cu.ipcOpenMemHandle, "cuIpcOpenMemHandle_v2"},
        {(void **)&cu.ipcCloseMemHandle, "cuIpcCloseMemHandle"},
        {(void **)&cu.memRetainAllocationHandle, "cuMemRetainAllocationHandle"},
        {(void **)&cu.memExportToShareableHandle, "cuMemExportToShareableHandle"},
        {(void **)&cu.memImportFromShareableHandle, "cuMemImportFromShareableHandle"},
        {(void **)&cu.memAddressReserve, "cuMemAddressReserve"},
        {(void **)&cu.memAddressFree, "cuMemAddressFree"},
        {(void **)&cu.memMap, "cuMemMap"},
        {(void **)&cu.memUnmap, "cuMemUnmap"},
        {(void **)&cu.memSetAccess, "cuMemSetAccess"},
        {(void **)&cu.memCreate, "cuMemCreate"},
        {(void **)&cu.memRelease, "cuMemRelease"},
        {(void **)&cu.memGetAllocationGranularity, "cuMemGetAllocationGranularity"},
        {(void **)&cu.memAlloc, "cuMemAlloc_v2"},
        {(void **)&cu.memFree, "cuMemFree_v2"},
        {(void **)&cu.memcpy, "cuMemcpy"},
        {(void **)&cu.getErrorName, "cuGetErrorName"},
    };
    if (gpu_bind_symbols(handle, table, sizeof table / sizeof table[0], name, " (CUDA 12 or newer needed)", error, capacity) != 0) {
        load_state = -2;
        pthread_mutex_unlock(&load_lock);
        return -2;
    }
    int version = 0;
    if (cu.driverGetVersion(&version) == CUDA_SUCCESS && version < 12000) {
        if (error && capacity) snprintf(error, capacity, "%s is CUDA %d.%d; 12.0 or newer needed", name, version / 1000, version % 1000 / 10);
        load_state = -2;
        pthread_mutex_unlock(&load_lock);
        return -2;
    }
    load_state = cu.init(0);
    if (load_state != CUDA_SUCCESS && error && capacity) snprintf(error, capacity, "cuInit: %s", cuda_error_name(load_state));
    pthread_mutex_unlock(&load_lock);
    return load_state;
}

static int cuda_driver_version(int *version) { return cu.driverGetVersion(version); }
static int cuda_device_count(int *count) { return cu.deviceGetCount(count); }

static int cuda_fabric_supported(int ordinal, int *supported) {
    CUdevice device;
    CUresult r = cu.deviceGet(&device, ordinal);
    return r ? r : cu.deviceGetAttribute(supported, CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, device);
}

static int cuda_bind_device(int ordinal) {
    static __thread int bound = -1; /* one primary-context reference per thread */
    if (bound == ordinal) return CUDA_SUCCESS;
    CUdevice device;
    CUcontext context;
    CUresult r = cu.deviceGet(&device, ordinal);
    if (!r) r = cu.primaryCtxRetain(&context, device);
    if (!r) r = cu.ctxSetCurrent(context);
    if (!r) bound = ordinal;
    return r;
}

static int cuda_pointer_info(uint64_t addr, int *is_device, int *device, uint64_t *base, uint64_t *size) {
    unsigned int type = 0;
    *is_device = 0;
    /* Host memory the driver never saw answers CUDA_ERROR_INVALID_VALUE: it is host memory. */
    if (cu.pointerGetAttribute(&type, CU_POINTER_ATTRIBUTE_MEMORY_TYPE, addr) != CUDA_SUCCESS || type != CU_MEMORYTYPE_DEVICE) return 0;
    *is_device = 1;
    CUresult r = cu.pointerGetAttribute(device, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, addr);
    CUdeviceptr start = 0;
    size_t length = 0;
    if (!r) r = cu.memGetAddressRange(&start, &length, addr);
    *base = start;
    *size = length;
    return r;
}

static int cuda_ipc_export(uint64_t base, uint8_t handle[GPU_HANDLE_BYTES]) {
    CUipcMemHandle h;
    CUresult r = cu.ipcGetMemHandle(&h, base);
    if (!r) memcpy(handle, &h, sizeof h);
    return r;
}

static int cuda_ipc_open(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t *addr) {
    CUipcMemHandle h;
    memcpy(&h, handle, sizeof h);
    CUdeviceptr mapped = 0;
    CUresult r = cu.ipcOpenMemHandle(&mapped, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
    *addr = mapped;
    return r;
}

static int cuda_ipc_close(uint64_t addr) { return cu.ipcCloseMemHandle(addr); }

static int cuda_fabric_export(uint64_t addr, uint8_t handle[GPU_HANDLE_BYTES]) {
    CUmemGenericAllocationHandle allocation;
    CUresult r = cu.memRetainAllocationHandle(&allocation, (void *)(uintptr_t)addr);
    if (r) return r;
    CUmemFabricHandle exported;
    r = cu.memExportToShareableHandle(&exported, allocation, CU_MEM_HANDLE_TYPE_FABRIC, 0);
    cu.memRelease(allocation); /* the retain's reference */
    if (!r) memcpy(handle, &exported, sizeof exported);
    return r;
}

static int map_handle(CUmemGenericAllocationHandle allocation, uint64_t size, int ordinal, uint64_t *addr) {
    CUdeviceptr va = 0;
    CUresult r = cu.memAddressReserve(&va, size, 0, 0, 0);
    if (r) return r;
    r = cu.memMap(va, size, 0, allocation, 0);
    if (r) { cu.memAddressFree(va, size); return r; }
    CUmemAccessDesc access = {{CU_MEM_LOCATION_TYPE_DEVICE, ordinal}, CU_MEM_ACCESS_FLAGS_PROT_READWRITE};
    r = cu.memSetAccess(va, size, &access, 1);
    if (r) { cu.memUnmap(va, size); cu.memAddressFree(va, size); return r; }
    *addr = va;
    return 0;
}

static int cuda_fabric_import(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t size, int ordinal, uint64_t *addr) {
    CUmemFabricHandle fabric;
    memcpy(&fabric, handle, sizeof fabric);
    CUmemGenericAllocationHandle allocation;
    CUresult r = cu.memImportFromShareableHandle(&allocation, &fabric, CU_MEM_HANDLE_TYPE_FABRIC);
    if (r) return r;
    r = map_handle(allocation, size, ordinal, addr);
    cu.memRelease(allocation); /* the mapping keeps the memory alive */
    return r;
}

static int cuda_fabric_unmap(uint64_t addr, uint64_t size) {
    CUresult r = cu.memUnmap(addr, size);
    cu.memAddressFree(addr, size);
    return r;
}

static int cuda_fabric_alloc(int ordinal, uint64_t size, uint64_t *addr, uint64_t *rounded) {
    CUmemAllocationProp prop;
    memset(&prop, 0, sizeof prop);
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_FABRIC;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = ordinal;
    size_t granularity = 0;
    CUresult r = cu.memGetAllocationGranularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM);
    if (r) return r;
    if (granularity == 0) granularity = 2 << 20;
    uint64_t total = (size + granularity - 1) / granularity * granularity;
    CUmemGenericAllocationHandle allocation;
    r = cu.memCreate(&allocation, total, &prop, 0);
    if (r) return r;
    r = map_handle(allocation, total, ordinal, addr);
    cu.memRelease(allocation);
    *rounded = total;
    return r;
}

static int cuda_alloc(uint64_t size, uint64_t *addr) {
    CUdeviceptr p = 0;
    CUresult r = cu.memAlloc(&p, size);
    *addr = p;
    return r;
}

static int cuda_free(uint64_t addr) { return cu.memFree(addr); }
static int cuda_copy(uint64_t destination, uint64_t source, uint64_t length) { return cu.memcpy(destination, source, length); }

static const char *cuda_error_name(int result) {
    static __thread char text[32];
    const char *name = NULL;
    if (cu.getErrorName && cu.getErrorName(result, &name) == CUDA_SUCCESS && name) return name;
    snprintf(text, sizeof text, "CUresult %d", result);
    return text;
}

static int cuda_has_fabric(void) { return 1; }

const gpu_backend gpu_cuda_backend = {
    cuda_load, cuda_driver_version, cuda_device_count, cuda_fabric_supported, cuda_bind_device, cuda_pointer_info,
    cuda_ipc_export, cuda_ipc_open, cuda_ipc_close, cuda_fabric_export, cuda_fabric_import, cuda_fabric_unmap,
    cuda_fabric_alloc, cuda_alloc, cuda_free, cuda_copy, cuda_error_name, cuda_has_fabric,
};
