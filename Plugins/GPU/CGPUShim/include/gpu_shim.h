/* GPU runtimes bound at run time with dlopen, behind one set of gpu_* calls:
 * the CUDA driver API (libcuda.so.1; Debian ships no CUDA headers, so the few
 * entry points used are declared here with the types and values of the
 * driver's cuda.h, CUDA 12) for nvlink and nvlink_intra, and HIP
 * (libamdhip64.so.6 or .so.5, compiled against Debian's hip_runtime_api.h when
 * libamdhip64-dev is installed) for hip. gpu_use picks the runtime once.
 * Every function returns the runtime's status (0 = success) unless stated. */
#ifndef GPU_SHIM_H
#define GPU_SHIM_H
#include <stddef.h>
#include <stdint.h>

/** Bytes of a CUipcMemHandle and of a CUmemFabricHandle. */
#define GPU_HANDLE_BYTES 64

/** The runtimes. */
#define GPU_RUNTIME_CUDA 0
#define GPU_RUNTIME_HIP 1

/** Selects the runtime every gpu_* call goes to (call before gpu_load). Returns 0, or -1 when this build lacks it. */
int gpu_use(int runtime);

/**
 * Loads the runtime library (`library`, or libcuda.so.1 / libamdhip64.so.6|.so.5),
 * resolves the entry points and initialises it. Returns 0, -1 when the library
 * is missing (error: dlerror), -2 when it lacks an entry point or is too old,
 * or the runtime's status (100 = no device, in CUDA and HIP alike). Safe to call
 * repeatedly.
 */
int gpu_load(const char *library, char *error, size_t error_capacity);
/** Driver version: CUDA 12040, HIP 50422xxx. */
int gpu_driver_version(int *version);
/** cuDeviceGetCount. */
int gpu_device_count(int *count);
/** Whether device `ordinal` can export fabric handles (CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED). */
int gpu_fabric_supported(int ordinal, int *supported);
/** Makes device `ordinal`'s primary context current on the calling thread. */
int gpu_bind_device(int ordinal);
/**
 * What addr is: *is_device = 1 for device memory (then *device, and the
 * allocation's *base and *size), 0 for host memory.
 */
int gpu_pointer_info(uint64_t addr, int *is_device, int *device, uint64_t *base, uint64_t *size);
/** cuIpcGetMemHandle for the allocation at base. */
int gpu_ipc_export(uint64_t base, uint8_t handle[GPU_HANDLE_BYTES]);
/** cuIpcOpenMemHandle (lazy peer access); *addr = the mapping in this process. */
int gpu_ipc_open(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t *addr);
/** cuIpcCloseMemHandle. */
int gpu_ipc_close(uint64_t addr);
/** Fabric handle of the cuMemCreate allocation mapped at addr (cuMemRetainAllocationHandle + cuMemExportToShareableHandle). */
int gpu_fabric_export(uint64_t addr, uint8_t handle[GPU_HANDLE_BYTES]);
/** Imports a fabric handle and maps size bytes of it read-write for device `ordinal`; *addr = the mapping. */
int gpu_fabric_import(const uint8_t handle[GPU_HANDLE_BYTES], uint64_t size, int ordinal, uint64_t *addr);
/** Unmaps and releases a mapping from cu_fabric_import or cu_fabric_alloc. */
int gpu_fabric_unmap(uint64_t addr, uint64_t size);
/** Allocates size bytes (rounded up to the granularity, *rounded) on device `ordinal`, exportable as a fabric handle. */
int gpu_fabric_alloc(int ordinal, uint64_t size, uint64_t *addr, uint64_t *rounded);
/** Allocates device memory (cuMemAlloc) for IPC export. */
int gpu_alloc(uint64_t size, uint64_t *addr);
/** cuMemFree. */
int gpu_free(uint64_t addr);
/** cuMemcpy (unified addressing: host or device on either side), synchronous. */
int gpu_copy(uint64_t destination, uint64_t source, uint64_t length);
/** The driver's name for a CUresult ("CUDA_ERROR_NO_DEVICE"), or "CUresult <n>". Never NULL. */
const char *gpu_error_name(int result);

/** Whether the runtime can export fabric handles at all (CUDA yes, HIP no). */
int gpu_has_fabric(void);

#endif
