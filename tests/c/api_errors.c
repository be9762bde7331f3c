/* Every refusal of the C API: status code and message, and nothing changed. */
#include <Python.h>
#include <stdio.h>
#include <string.h>

#include "interheap.h"

static int ok = 1;

static void expect(const char *what, int rc, int want, const char *fragment) {
    const char *msg = interheap_last_error();
    int good = rc == want && (!fragment || strstr(msg, fragment));
    printf("%-52s %-28s %s\n", what, interheap_status_name(rc), good ? "ok" : "FAILED");
    if (!good) {
        printf("  message: %s\n", msg);
        ok = 0;
    }
}

static void *f_malloc(void *ctx, size_t n) {
    PyMemAllocatorEx *under = ctx;
    return under->malloc(under->ctx, n);
}
static void *f_calloc(void *ctx, size_t n, size_t e) {
    PyMemAllocatorEx *under = ctx;
    return under->calloc(under->ctx, n, e);
}
static void *f_realloc(void *ctx, void *p, size_t n) {
    PyMemAllocatorEx *under = ctx;
    return under->realloc(under->ctx, p, n);
}
static void f_free(void *ctx, void *p) {
    PyMemAllocatorEx *under = ctx;
    under->free(under->ctx, p);
}

static PyMemAllocatorEx under_obj, under_mem;

int main(void) {
    Py_InitializeEx(0);
    interheap_adapter_id a = 0, b = 0;
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &under_obj);
    PyMem_GetAllocator(PYMEM_DOMAIN_MEM, &under_mem);
    PyMemAllocatorEx wrap = {&under_obj, f_malloc, f_calloc, f_realloc, f_free};
    PyMemAllocatorEx broken = wrap;
    broken.realloc = NULL;

    expect("NULL allocator", interheap_install(PYMEM_DOMAIN_OBJ, NULL, 0, NULL, &a), INTERHEAP_ERR_INVALID, "NULL");
    expect("NULL function", interheap_install(PYMEM_DOMAIN_OBJ, &broken, 0, NULL, &a), INTERHEAP_ERR_INVALID,
           "realloc is NULL");
    expect("unknown domain", interheap_install((PyMemAllocatorDomain)7, &wrap, 0, NULL, &a),
           INTERHEAP_ERR_INVALID, "unknown domain");
    expect("unknown flag", interheap_install(PYMEM_DOMAIN_OBJ, &wrap, 0x100, NULL, &a), INTERHEAP_ERR_INVALID,
           "unknown flags");
    int want = INTERHEAP_ERR_AFTER_INIT;
#ifdef Py_GIL_DISABLED
    want = INTERHEAP_ERR_FREE_THREADED;
#endif
    expect("replacement after Py_Initialize",
           interheap_install(PYMEM_DOMAIN_OBJ, &wrap, INTERHEAP_OWNS_MEMORY, NULL, &a), want, NULL);

    expect("wrapper after Py_Initialize", interheap_install(PYMEM_DOMAIN_OBJ, &wrap, 0, "first", &a), INTERHEAP_OK,
           NULL);
    PyRun_SimpleString("x = [str(i) for i in range(1000)]");
    expect("a second wrapper on top", interheap_install(PYMEM_DOMAIN_OBJ, &wrap, 0, "second", &b), INTERHEAP_OK,
           NULL);
    expect("uninstall the covered one", interheap_uninstall(a), INTERHEAP_ERR_NOT_ON_TOP, "sits on top");
    expect("uninstall the top one", interheap_uninstall(b), INTERHEAP_OK, NULL);
    expect("uninstall the first one", interheap_uninstall(a), INTERHEAP_OK, NULL);
    expect("uninstall it again", interheap_uninstall(a), INTERHEAP_ERR_NOT_INSTALLED, NULL);
    expect("uninstall an unknown ID", interheap_uninstall(999), INTERHEAP_ERR_UNKNOWN, "999");
    interheap_adapter_stats s;
    expect("stats of an unknown ID", interheap_adapter_stats_get(999, &s), INTERHEAP_ERR_UNKNOWN, NULL);
    expect("stats of the first one", interheap_adapter_stats_get(a, &s), INTERHEAP_OK, NULL);
    if (s.calls == 0 || s.installed || s.kind != INTERHEAP_KIND_LEGACY)
        ok = 0;

    interheap_aware_allocator aware = {NULL, NULL, NULL, NULL, NULL};
    expect("interpreter-aware with NULL functions",
           interheap_install_aware(PYMEM_DOMAIN_MEM, &aware, 0, NULL, &a), INTERHEAP_ERR_INVALID, "malloc is NULL");
    interheap_instance_allocator inst = {NULL, NULL, NULL, NULL, NULL, NULL};
    interheap_dispatcher *d = interheap_dispatcher_new(&inst);
    printf("%-52s %-28s %s\n", "dispatcher without create()", d ? "(a dispatcher)" : "NULL", d ? "FAILED" : "ok");
    if (d || !strstr(interheap_last_error(), "create is NULL"))
        ok = 0;
    expect("dispatcher install with NULL", interheap_dispatcher_install(NULL, PYMEM_DOMAIN_RAW, NULL, NULL),
           INTERHEAP_ERR_INVALID, NULL);

    /* Nothing above changed the allocators. */
    PyMemAllocatorEx now;
    PyMem_GetAllocator(PYMEM_DOMAIN_OBJ, &now);
    int unchanged = memcmp(&now, &under_obj, sizeof now) == 0;
    printf("%-52s %-28s %s\n", "object allocator restored", "", unchanged ? "ok" : "FAILED");
    ok &= unchanged;
    if (Py_FinalizeEx() < 0)
        ok = 0;
    printf("%s\n", ok ? "RESULT ok" : "RESULT FAILED");
    return ok ? 0 : 1;
}
