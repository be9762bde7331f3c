/* One pointer per thread that the allocator hooks reach without calling into
 * the dynamic loader.
 *
 * Rust's thread-locals in a shared library use the general-dynamic TLS model:
 * every access calls __tls_get_addr, about 22 instructions here (callgrind),
 * twice per allocation and free pair. This variable uses the initial-exec
 * model instead: one load relative to the thread pointer. It holds the
 * address of the thread's hook state (a Rust thread-local, see
 * hook_thread.rs), set on the thread's first hook call.
 *
 * Initial-exec TLS in a library loaded with dlopen takes its 8 bytes from the
 * static TLS space glibc reserves for such libraries (hundreds of bytes).
 */
#include <stddef.h>

/* Not static: on x86-64 Linux the Rust side reads it with inline assembly
 * (two instructions, inlined); elsewhere through the getter below. */
__attribute__((visibility("hidden"))) __thread void *interheap_thread_slot
    __attribute__((tls_model("initial-exec")));

__attribute__((visibility("hidden"))) void *interheap_thread_slot_get(void) {
    return interheap_thread_slot;
}

__attribute__((visibility("hidden"))) void interheap_thread_slot_set(void *value) {
    interheap_thread_slot = value;
}
