/* Internal to the C API implementation: not installed with transfer_engine_c.h. */
#ifndef TE_C_INTERNAL_H
#define TE_C_INTERNAL_H
/** Sets the calling thread's te_last_error() text (copied, truncated to 1023 bytes). */
void te_set_last_error(const char *message);
#endif
