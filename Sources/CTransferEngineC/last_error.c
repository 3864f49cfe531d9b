/* Thread-local error text for the C API (C11 _Thread_local: Swift has no thread-local storage). */
#include "transfer_engine_c.h"
#include "te_c_internal.h"
#include <string.h>

static _Thread_local char last_error[1024];

const char *te_last_error(void) { return last_error; }

void te_set_last_error(const char *message) {
    if (!message) { last_error[0] = 0; return; }
    strncpy(last_error, message, sizeof last_error - 1);
    last_error[sizeof last_error - 1] = 0;
}
