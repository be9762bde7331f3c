/* Embeds CPython with the interheap allocator installed through the C API
 * (include/interheap_allocator.h), runs two isolated interpreters' worth of
 * work, and prints the allocator's JSON report. Used by tests/test_c_api.py.
 * Usage: embed_allocator [DOMAINS [OPTIONS]]   (bit masks, default 7 and 0) */
#include <Python.h>
#include <stdio.h>
#include <stdlib.h>

#include "interheap_allocator.h"

int main(int argc, char **argv) {
    unsigned domains = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : INTERHEAP_DOMAIN_ALL;
    unsigned options = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : 0;
    char err[512];
    PyPreConfig pre;
    PyPreConfig_InitPythonConfig(&pre);
    PyStatus status = Py_PreInitialize(&pre);
    if (PyStatus_Exception(status)) Py_ExitStatusException(status);
    if (interheap_allocator_install_with(domains, 0x10, err, sizeof err) == 0) {
        printf("unknown option accepted\n");
        return 1;
    }
    printf("unknown option refused: %s\n", err);
    if (interheap_allocator_install_with(domains, options, err, sizeof err) != 0) {
        printf("install refused: %s\n", err);
        return 3;
    }
    /* A second install is refused, and nothing changes. */
    if (interheap_allocator_install(domains, err, sizeof err) == 0) {
        printf("second install accepted\n");
        return 1;
    }
    printf("second install refused: %s\n", err);
    Py_Initialize();
    if (interheap_allocator_install(domains, err, sizeof err) == 0) {
        printf("install after Py_Initialize accepted\n");
        return 1;
    }
    PyRun_SimpleString(
        "import sys\n"
        "keep = [bytes(200) for _ in range(30000)]\n"
        "print('python ran', len(keep))\n");
    printf("installed=%u\n", interheap_allocator_installed());
    char *report = interheap_allocator_report_json();
    printf("REPORT %s\n", report ? report : "null");
    interheap_allocator_free_string(report);
    if (Py_FinalizeEx() < 0) return 120;
    printf("RESULT ok\n");
    return 0;
}
