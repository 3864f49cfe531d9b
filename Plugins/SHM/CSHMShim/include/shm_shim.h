/* Cross-memory attach (process_vm_readv/writev) for the shm plugin: GNU extensions
 * that Swift's Glibc module does not expose. */
#ifndef SHM_SHIM_H
#define SHM_SHIM_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/** Copies length bytes from local_addr into pid's remote_addr; returns bytes moved or -errno. */
int64_t shm_write_to(pid_t pid, uint64_t local_addr, uint64_t remote_addr, uint64_t length);
/** Copies length bytes from pid's remote_addr into local_addr; returns bytes moved or -errno. */
int64_t shm_read_from(pid_t pid, uint64_t local_addr, uint64_t remote_addr, uint64_t length);
/** Allows any process of this user to attach (prctl PR_SET_PTRACER_ANY; a no-op without Yama). */
void shm_allow_attach(void);
/** This process's pid. */
pid_t shm_getpid(void);
#endif
