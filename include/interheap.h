/*
 * interheap.h: keep a custom CPython allocator written before per-interpreter
 * GILs, and run isolated subinterpreters (3.12+) or free-threaded CPython
 * (3.14t) safely.
 *
 * Link with -linterheap (libinterheap.so or libinterheap.a, built by
 * `cargo build --release -p interheap-c` against the same CPython) and with
 * libpython. Every function is safe to call from any thread; the install
 * functions follow PyMem_SetAllocator's rule: call them while no other
 * thread allocates.
 *
 * What it offers (the options of the "custom allocators and the GIL"
 * discussion that CPython did not adopt):
 *
 *   1. Lock wrapper (option 2): interheap_install() with flags 0. The
 *      allocator's calls never overlap. For the mem and object domains of a
 *      default build no lock is taken while the process has only the main
 *      GIL (the main interpreter and interpreters sharing its GIL); the
 *      first call from an interpreter with its own GIL switches the adapter
 *      to locking, for good, without a race with a call in flight. The raw
 *      domain is never protected by a GIL (PyMem_RawMalloc is called
 *      without one), so it always locks; so does every domain of a
 *      free-threaded build. The lock spins briefly, then sleeps.
 *   2. Thread-safe flag (option 3): INTERHEAP_THREAD_SAFE: no lock, only the
 *      forwarding and the figures.
 *   3. Interpreter-aware interface (options 4 and 5):
 *      interheap_install_aware(): every call receives an interheap_context
 *      (interpreter ID, domain, own GIL, own object-allocator state).
 *   4. Per-interpreter dispatcher: one allocator instance per interpreter,
 *      created when the interpreter first allocates; frees go back to the
 *      instance that owns the block; an instance is released once its
 *      interpreter has ended and it holds nothing.
 *
 * When each may be installed (CPython's rules):
 *
 *   - An allocator that OWNS ITS MEMORY (INTERHEAP_OWNS_MEMORY: a free list,
 *     a bump allocator, anything that does not forward to the allocator
 *     installed before it) replaces CPython's: install it after
 *     Py_PreInitialize() and before Py_InitializeFromConfig() (and before
 *     building a PyConfig). Afterwards it is refused
 *     (INTERHEAP_ERR_AFTER_INIT), and on a free-threaded build it is refused
 *     for the mem and object domains at any time
 *     (INTERHEAP_ERR_FREE_THREADED): the garbage collector there walks
 *     CPython's mimalloc heaps. It can never be uninstalled.
 *   - An allocator that WRAPS (gets the current allocator with
 *     PyMem_GetAllocator() and forwards to it, as tracemalloc does) can be
 *     installed at any time, and uninstalled if nothing was installed on
 *     top of it since.
 *
 * Every allocator must follow PEP 445: malloc(0) returns a unique non-NULL
 * pointer, realloc(NULL, n) allocates, free(NULL) does nothing. interheap
 * refuses a calloc whose nelem * elsize overflows before your allocator sees
 * it. Allocators must not call Python, and must not call back into the
 * domain they serve.
 *
 * See examples/embed_legacy_allocator.c for a complete program.
 */
#ifndef INTERHEAP_H
#define INTERHEAP_H

#include <Python.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INTERHEAP_ABI_VERSION 1

/* Results. Every failure also sets a message: interheap_last_error(). */
typedef enum {
    INTERHEAP_OK = 0,
    INTERHEAP_ERR_INVALID = 1,        /* NULL function or pointer, unknown domain */
    INTERHEAP_ERR_AFTER_INIT = 2,     /* owns-memory allocator after Py_Initialize */
    INTERHEAP_ERR_FREE_THREADED = 3,  /* owns-memory allocator for mem/object, free-threaded build */
    INTERHEAP_ERR_UNKNOWN = 4,        /* no adapter with that ID */
    INTERHEAP_ERR_OWNS_MEMORY = 5,    /* cannot uninstall: CPython holds its blocks */
    INTERHEAP_ERR_NOT_INSTALLED = 6,  /* already uninstalled */
    INTERHEAP_ERR_NOT_ON_TOP = 7,     /* something was installed on top of it since */
    INTERHEAP_ERR_TOO_MANY = 8        /* at most 256 adapters per process */
} interheap_status;

/* Flags for the install functions. */
#define INTERHEAP_THREAD_SAFE 0x1u /* the allocator is thread-safe: never lock */
#define INTERHEAP_OWNS_MEMORY 0x2u /* a replacement, not a wrapper (see above) */

/* An installed adapter, unique in the process (from 1). */
typedef uint64_t interheap_adapter_id;

/* The message of this thread's last failed call ("" if none). Valid until
   this thread's next interheap call. */
const char *interheap_last_error(void);

/* "INTERHEAP_OK", "INTERHEAP_ERR_AFTER_INIT", ... */
const char *interheap_status_name(int status);

/* ---- Options 2 and 3: a PyMemAllocatorEx behind the lock wrapper ------- */

/* Installs `allocator` (copied; its functions and ctx must stay valid) for
   `domain`. `name` (may be NULL) appears in the figures. */
int interheap_install(PyMemAllocatorDomain domain, const PyMemAllocatorEx *allocator, unsigned flags,
                      const char *name, interheap_adapter_id *id_out);

/* Restores the allocator that was installed before the adapter. */
int interheap_uninstall(interheap_adapter_id id);

typedef enum {
    INTERHEAP_MODE_UNLOCKED = 0,    /* only the main GIL exists: no lock */
    INTERHEAP_MODE_DRAINING = 1,    /* switching to locked */
    INTERHEAP_MODE_LOCKED = 2,      /* every call holds the lock */
    INTERHEAP_MODE_THREAD_SAFE = 3  /* INTERHEAP_THREAD_SAFE: never locks */
} interheap_mode;

typedef enum {
    INTERHEAP_KIND_LEGACY = 0,
    INTERHEAP_KIND_INTERPRETER_AWARE = 1,
    INTERHEAP_KIND_DISPATCHER = 2
} interheap_kind;

/* An adapter's figures. Counters of a busy adapter may be one call behind. */
typedef struct {
    interheap_adapter_id id;
    int domain;           /* PyMemAllocatorDomain */
    int kind;             /* interheap_kind */
    int mode;             /* interheap_mode */
    int installed;        /* not uninstalled */
    int on_top;           /* CPython calls it first in its domain now */
    int owns_memory;
    int membarrier;       /* the unlocked fast path relies on membarrier() */
    uint64_t calls;                  /* calls forwarded to the allocator */
    uint64_t lock_acquisitions;      /* calls that took the lock */
    uint64_t contended_acquisitions; /* of those, found it held */
    int has_switched;     /* switched from unlocked to locked */
    int64_t switched_by;  /* the interpreter whose call switched it (-1: no thread state) */
} interheap_adapter_stats;

int interheap_adapter_stats_get(interheap_adapter_id id, interheap_adapter_stats *out);

/* ---- Options 4 and 5: interpreter-aware allocators --------------------- */

/* What every interpreter-aware call receives. */
typedef struct {
    int64_t interpreter_id; /* the calling interpreter, -1 without a thread state */
    int domain;             /* PyMemAllocatorDomain of the call */
    int own_gil;            /* 1 own GIL, 0 shares the main GIL, -1 unknown (3.12 subinterpreters) */
    int own_obmalloc;       /* 1 own object-allocator state, 0 main's, -1 unknown */
} interheap_context;

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, const interheap_context *cx, size_t size);
    void *(*calloc)(void *ctx, const interheap_context *cx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, const interheap_context *cx, void *ptr, size_t new_size);
    void (*free)(void *ctx, const interheap_context *cx, void *ptr);
} interheap_aware_allocator;

/* Installs an interpreter-aware allocator. Calls are serialised exactly as
   for interheap_install() unless INTERHEAP_THREAD_SAFE is given. A free may
   come from another interpreter than the one that allocated the block. */
int interheap_install_aware(PyMemAllocatorDomain domain, const interheap_aware_allocator *allocator,
                            unsigned flags, const char *name, interheap_adapter_id *id_out);

/* ---- The per-interpreter dispatcher ------------------------------------ */

/* How the dispatcher makes and uses one instance per interpreter. Calls
   into one instance never overlap (each instance has its own lock), so an
   instance need not be thread-safe; different instances run in parallel.
   create/destroy may run on any thread. None of these may call Python's
   allocators. */
typedef struct {
    void *ctx;
    /* A new instance for cx->interpreter_id (-1: calls without a thread state), or NULL. */
    void *(*create)(void *ctx, const interheap_context *cx);
    /* Releases an instance: its interpreter ended and it holds no block. */
    void (*destroy)(void *ctx, void *instance);
    /* A 16-byte-aligned block of at least `size` bytes, or NULL. */
    void *(*malloc)(void *ctx, void *instance, size_t size);
    /* Optional (may be NULL: malloc + copy + free). NULL result keeps the block. */
    void *(*realloc)(void *ctx, void *instance, void *ptr, size_t old_size, size_t new_size);
    /* Frees a block of this instance; `size` is what malloc/realloc was asked for. */
    void (*free)(void *ctx, void *instance, void *ptr, size_t size);
} interheap_instance_allocator;

typedef struct interheap_dispatcher interheap_dispatcher;

/* A new dispatcher (it lives until the process ends), or NULL if a required
   function is missing. */
interheap_dispatcher *interheap_dispatcher_new(const interheap_instance_allocator *allocator);

/* Installs the dispatcher for `domain`. It owns its memory (it puts a
   16-byte header before each block), so the owns-memory rules apply: after
   Py_PreInitialize, before Py_InitializeFromConfig; never for mem/object on
   a free-threaded build. One dispatcher may serve several domains; an
   interpreter's instance then serves all of them. */
int interheap_dispatcher_install(interheap_dispatcher *d, PyMemAllocatorDomain domain, const char *name,
                                 interheap_adapter_id *id_out);

/* One domain's figures in one instance. Sizes are what callers asked for. */
typedef struct {
    uint64_t live_bytes;
    uint64_t live_blocks;
    uint64_t allocations;   /* malloc, calloc, realloc(NULL), moves into the instance */
    uint64_t frees;         /* including moves out of it */
    uint64_t reallocations; /* resized in place */
    uint64_t cross_frees;   /* frees made by another interpreter (or none) */
    uint64_t failures;
} interheap_domain_figures;

typedef struct {
    int64_t interpreter_id;             /* -1: calls without a thread state */
    interheap_domain_figures domains[3]; /* indexed by PyMemAllocatorDomain */
    int ended;                          /* interheap_dispatcher_end_interpreter() was called */
    int released;                       /* its instance was destroyed */
    uint64_t created;                   /* instances created for this interpreter */
} interheap_instance_stats;

/* Tells the dispatcher that interpreter `id` has ended (call it after
   Py_EndInterpreter). Its instance is destroyed now if it holds nothing, or
   when its last block is freed. `out` (may be NULL) receives its figures:
   what it still holds. INTERHEAP_ERR_UNKNOWN if it never allocated. */
int interheap_dispatcher_end_interpreter(interheap_dispatcher *d, int64_t id, interheap_instance_stats *out);

/* Copies up to `capacity` instances' figures into `out` (in the order
   interpreters first allocated) and returns how many instances exist. */
size_t interheap_dispatcher_instances(interheap_dispatcher *d, interheap_instance_stats *out, size_t capacity);

#ifdef __cplusplus
}
#endif

#endif /* INTERHEAP_H */
