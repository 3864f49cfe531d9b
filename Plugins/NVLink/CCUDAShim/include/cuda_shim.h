/* The CUDA driver API, bound at run time: Debian ships no CUDA headers, so the
 * nvlink plugins declare the few entry points they use (types and values as in
 * the driver's cuda.h, CUDA 12) and resolve them with dlopen("libcuda.so.1").
 * Every function returns a CUresult (0 = CUDA_SUCCESS) unless stated. */
#ifndef CUDA_SHIM_H
#define CUDA_SHIM_H
#include <stddef.h>
#include <stdint.h>

/** Bytes of a CUipcMemHandle and of a CUmemFabricHandle. */
#define CU_SHIM_HANDLE_BYTES 64

/**
 * Loads libcuda.so.1 (or MC_CUDA_LIBRARY), resolves the entry points and calls
 * cuInit. Returns 0, -1 when the library is missing (error: dlerror), -2 when it
 * lacks an entry point or is older than CUDA 12, or the CUresult of cuInit
 * (100 = CUDA_ERROR_NO_DEVICE). Safe to call repeatedly.
 */
int cu_load(const char *library, char *error, size_t error_capacity);
/** cuDriverGetVersion, e.g. 12040. */
int cu_driver_version(int *version);
/** cuDeviceGetCount. */
int cu_device_count(int *count);
/** Whether device `ordinal` can export fabric handles (CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED). */
int cu_fabric_supported(int ordinal, int *supported);
/** Makes device `ordinal`'s primary context current on the calling thread. */
int cu_bind_device(int ordinal);
/**
 * What addr is: *is_device = 1 for device memory (then *device, and the
 * allocation's *base and *size), 0 for host memory.
 */
int cu_pointer_info(uint64_t addr, int *is_device, int *device, uint64_t *base, uint64_t *size);
/** cuIpcGetMemHandle for the allocation at base. */
int cu_ipc_export(uint64_t base, uint8_t handle[CU_SHIM_HANDLE_BYTES]);
/** cuIpcOpenMemHandle (lazy peer access); *addr = the mapping in this process. */
int cu_ipc_open(const uint8_t handle[CU_SHIM_HANDLE_BYTES], uint64_t *addr);
/** cuIpcCloseMemHandle. */
int cu_ipc_close(uint64_t addr);
/** Fabric handle of the cuMemCreate allocation mapped at addr (cuMemRetainAllocationHandle + cuMemExportToShareableHandle). */
int cu_fabric_export(uint64_t addr, uint8_t handle[CU_SHIM_HANDLE_BYTES]);
/** Imports a fabric handle and maps size bytes of it read-write for device `ordinal`; *addr = the mapping. */
int cu_fabric_import(const uint8_t handle[CU_SHIM_HANDLE_BYTES], uint64_t size, int ordinal, uint64_t *addr);
/** Unmaps and releases a mapping from cu_fabric_import or cu_fabric_alloc. */
int cu_fabric_unmap(uint64_t addr, uint64_t size);
/** Allocates size bytes (rounded up to the granularity, *rounded) on device `ordinal`, exportable as a fabric handle. */
int cu_fabric_alloc(int ordinal, uint64_t size, uint64_t *addr, uint64_t *rounded);
/** Allocates device memory (cuMemAlloc) for IPC export. */
int cu_alloc(uint64_t size, uint64_t *addr);
/** cuMemFree. */
int cu_free(uint64_t addr);
/** cuMemcpy (unified addressing: host or device on either side), synchronous. */
int cu_copy(uint64_t destination, uint64_t source, uint64_t length);
/** The driver's name for a CUresult ("CUDA_ERROR_NO_DEVICE"), or "CUresult <n>". Never NULL. */
const char *cu_error_name(int result);

#endif
