/* Raw blocks under the interheap allocator count for the interpreter whose
 * thread state is current (tests/test_c_api.py): its figures and its limit
 * see them; raw calls without a thread state are never limited; a raw block
 * freed in another interpreter comes off the first one's figures.
 * Prints "CHECK <what> ok|FAILED ..." lines, then "RESULT ok". */
#include "embed_support.h"

#define BLOCKS 100
#define BLOCK_SIZE 10000

static int failures = 0;

static void check(int ok, const char *what, long long a, long long b) {
    printf("CHECK %s %s (%lld, %lld)\n", what, ok ? "ok" : "FAILED", a, b);
    if (!ok) failures++;
}

static interheap_interp_figures figures(long long id) {
    interheap_interp_figures f = {0};
    if (interheap_allocator_interp_figures(id, &f) != 0) {
        printf("CHECK figures of %lld FAILED (no heaps)\n", id);
        failures++;
    }
    return f;
}

int main(void) {
    start_with_interheap();
    PyThreadState *main_tstate = PyThreadState_Get();
    PyThreadState *sub = new_isolated_interpreter();
    if (sub == NULL) return 1;
    long long id = (long long)PyInterpreterState_GetID(PyThreadState_GetInterpreter(sub));
    char err[512];

    /* Raw blocks made while the subinterpreter's thread state is current. */
    long long before = figures(id).live_bytes;
    void *blocks[BLOCKS];
    for (int i = 0; i < BLOCKS; i++) blocks[i] = PyMem_RawMalloc(BLOCK_SIZE);
    long long held = figures(id).live_bytes;
    check(held - before >= BLOCKS * BLOCK_SIZE && held - before < BLOCKS * BLOCK_SIZE + 200000,
          "raw blocks count in the current interpreter's live bytes", before, held);

    /* A limit 512 KB above what it holds: a 1 MB raw block is refused. */
    if (interheap_allocator_set_limit(id, held + 512 * 1024, err, sizeof err) != 0) {
        printf("set_limit failed: %s\n", err);
        return 1;
    }
    void *big = PyMem_RawMalloc(1000 * 1000);
    interheap_interp_figures f = figures(id);
    check(big == NULL && f.refused == 1 && f.largest_refused >= 1000 * 1000,
          "a raw block past the limit is refused", (long long)f.refused, (long long)f.largest_refused);
    PyMem_RawFree(big);

    /* Without a thread state nothing is limited, and nothing counts here. */
    PyThreadState_Swap(NULL);
    void *unlimited = PyMem_RawMalloc(1000 * 1000);
    PyThreadState_Swap(sub);
    f = figures(id);
    check(unlimited != NULL && f.refused == 1 && f.live_bytes < held + 512 * 1024,
          "raw calls without a thread state are never limited nor counted", f.live_bytes, held);
    PyMem_RawFree(unlimited);

    /* Freed, the room is back: the same 1 MB fits once the blocks are gone. */
    for (int i = 0; i < BLOCKS; i++) PyMem_RawFree(blocks[i]);
    big = PyMem_RawMalloc(1000 * 1000);
    check(big != NULL, "after freeing, a raw block that fits the limit is served", figures(id).live_bytes,
          held);

    /* Freed in the main interpreter, the block leaves the subinterpreter's figures. */
    long long with_big = figures(id).live_bytes;
    PyThreadState_Swap(main_tstate);
    PyMem_RawFree(big);
    PyThreadState_Swap(sub);
    long long after = figures(id).live_bytes;
    check(with_big - after >= 1000 * 1000, "a raw block freed in another interpreter leaves the figures",
          with_big, after);

    Py_EndInterpreter(sub);
    PyThreadState_Swap(main_tstate);
    print_report("REPORT");
    if (Py_FinalizeEx() < 0) return 120;
    if (failures) return 1;
    printf("RESULT ok\n");
    return 0;
}
