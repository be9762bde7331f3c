/* interheap's allocator, for programs that embed CPython.
 *
 * Link against libinterheap (frontends/c; scripts/setup.sh puts it in
 * <venv>/interheap-c/lib), or use the interheap-python launcher.
 * Call interheap_allocator_install() after Py_PreInitialize*() and before
 * Py_Initialize*(): mem and object allocations then come from one heap per
 * interpreter, raw allocations from a shared thread-safe heap. On
 * free-threaded builds only the raw domain can be served (mem and object stay
 * CPython's mimalloc); asking for more fails with a message.
 */
#ifndef INTERHEAP_ALLOCATOR_H
#define INTERHEAP_ALLOCATOR_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INTERHEAP_DOMAIN_RAW 1u
#define INTERHEAP_DOMAIN_MEM 2u
#define INTERHEAP_DOMAIN_OBJECT 4u
#define INTERHEAP_DOMAIN_ALL 7u

/* Returns 0 on success; -1 with a NUL-terminated message in err (if err is
 * not NULL) otherwise. Nothing changes on failure. */
int interheap_allocator_install(unsigned domains, char *err, size_t err_len);

/* The domains the allocator serves (0 if not installed). */
unsigned interheap_allocator_installed(void);

/* The figures of every heap as JSON; free with interheap_allocator_free_string. */
char *interheap_allocator_report_json(void);
void interheap_allocator_free_string(char *s);

#ifdef __cplusplus
}
#endif

#endif
