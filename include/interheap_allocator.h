/* interheap's allocator, for programs that embed CPython.
 *
 * Link against libinterheap (frontends/c; scripts/setup.sh puts it in
 * <venv>/interheap-c/lib), or use the interheap-python launcher.
 * Call interheap_allocator_install() after Py_PreInitialize*() and before
 * Py_Initialize*(): mem and object allocations then come from one heap per
 * interpreter and domain, and so do raw allocations made while one of the
 * interpreter's thread states is current; raw allocations without a thread
 * state come from a shared thread-safe heap. On
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

/* Options of interheap_allocator_install_with(). REQUESTED_SIZES: the heaps
 * keep the size each block was asked for, so that their live and peak bytes
 * are the bytes callers asked for (as interheap's hooks count them) rather
 * than block sizes; about 22 instructions per malloc and free pair, and a
 * byte per small block. */
#define INTERHEAP_OPTION_REQUESTED_SIZES 1u

/* interheap_allocator_install() with options (a bit mask of the above). */
int interheap_allocator_install_with(unsigned domains, unsigned options, char *err, size_t err_len);

/* The domains the allocator serves (0 if not installed). */
unsigned interheap_allocator_installed(void);

/* The figures of every heap as JSON; free with interheap_allocator_free_string. */
char *interheap_allocator_report_json(void);
void interheap_allocator_free_string(char *s);

/* Whether the allocator runs its checking layer (INTERHEAP_CHECK=1 in
 * interheap-python): buffer overruns and uses after free in mem and object. */
unsigned interheap_allocator_checks_on(void);

/* Sends the checking layer's findings to sink (NULL: the library's own
 * checker). kind indexes the checker's kinds (7: use after free, 8: buffer
 * overrun), domain is 0 raw, 1 mem, 2 object; note is valid during the
 * call; file and name are NULL (the calling thread's stack applies), or the
 * Python frame where the block was freed. The sink runs inside an allocator call: it must not call Python's
 * allocator. */
typedef void (*interheap_finding_sink)(unsigned kind, unsigned domain, size_t size, const char *note,
                                       const char *file, const char *name, int line);
void interheap_allocator_check_sink(interheap_finding_sink sink);

/* Memory limits (mem, object, and raw calls made with a thread state; not
 * on free-threaded builds).
 * An interpreter's live bytes may not grow past its limit: the allocation
 * that would cross it, on a heap's slow path, returns NULL, so CPython raises
 * MemoryError in that interpreter only. It can be over by at most what the
 * current pages of its size classes still hold free (16 KiB per class for
 * most). After a refusal, 256 KiB more are granted once, to raise and handle
 * the MemoryError. Main's limit (ID 0) may be set before Py_Initialize.
 *
 * set_limit: limit < 0 removes it. Returns 0, or -1 with a message in err
 * (unknown or ended interpreter; the allocator does not serve mem and
 * object). Nothing changes on failure. */
int interheap_allocator_set_limit(long long interp_id, long long limit, char *err, size_t err_len);
/* The limit in bytes; -1 if none, -2 if the interpreter has no heaps. */
long long interheap_allocator_get_limit(long long interp_id);
/* Every interpreter with an ID >= from_id whose own limit is never set gets
 * this limit once it is created (not during its start-up, on 3.13+). */
int interheap_allocator_set_default_limit(long long limit, long long from_id, char *err, size_t err_len);

/* One interpreter's figures (what the in-interpreter module interheap_interp
 * reads). limit is -1 when there is none; peak is the exact peak of the live
 * bytes while a limit was set (0: never). */
typedef struct {
    long long live_bytes;
    long long limit;
    unsigned long long refused;
    unsigned long long largest_refused;
    unsigned long long peak;
} interheap_interp_figures;

/* 0; -1 if the allocator does not serve mem and object; -2 if the
 * interpreter has no heaps. */
int interheap_allocator_interp_figures(long long interp_id, interheap_interp_figures *out);
/* Lowers the limit (or sets one where there was none): 0; 1, changing
 * nothing, if that would raise it; -1 with a message in err otherwise. */
int interheap_allocator_lower_limit(long long interp_id, unsigned long long limit, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif
