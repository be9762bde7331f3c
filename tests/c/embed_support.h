/* Shared by the C test programs that embed CPython with the interheap
 * allocator: start-up, isolated subinterpreters and the allocator's report. */
#ifndef INTERHEAP_TESTS_EMBED_SUPPORT_H
#define INTERHEAP_TESTS_EMBED_SUPPORT_H

#include <Python.h>
#include <stdio.h>
#include <stdlib.h>

#include "interheap_allocator.h"

/* Pre-initializes, installs the interheap allocator for `domains`
 * (INTERHEAP_DOMAIN_*) and initializes; exits with 3 (printing why) if the
 * install is refused. */
static inline void start_with_interheap_for(unsigned domains) {
    char err[512];
    PyPreConfig pre;
    PyPreConfig_InitPythonConfig(&pre);
    PyStatus status = Py_PreInitialize(&pre);
    if (PyStatus_Exception(status)) Py_ExitStatusException(status);
    if (interheap_allocator_install(domains, err, sizeof err) != 0) {
        printf("install refused: %s\n", err);
        exit(3);
    }
    Py_Initialize();
}

/* The same for every domain. */
static inline void start_with_interheap(void) { start_with_interheap_for(INTERHEAP_DOMAIN_ALL); }

/* A new isolated interpreter (own GIL, own obmalloc state); its first thread
 * state is current on return, or NULL (printed) on failure. */
static inline PyThreadState *new_isolated_interpreter(void) {
    PyInterpreterConfig config = {
        .use_main_obmalloc = 0,
        .allow_fork = 0,
        .allow_exec = 0,
        .allow_threads = 1,
        .allow_daemon_threads = 0,
        .check_multi_interp_extensions = 1,
        .gil = PyInterpreterConfig_OWN_GIL,
    };
    PyThreadState *sub = NULL;
    PyStatus status = Py_NewInterpreterFromConfig(&sub, &config);
    if (PyStatus_Exception(status)) {
        printf("Py_NewInterpreterFromConfig failed: %s\n", status.err_msg ? status.err_msg : "?");
        return NULL;
    }
    return sub;
}

/* Prints "<tag> <the allocator's JSON report>" on one line. */
static inline void print_report(const char *tag) {
    char *report = interheap_allocator_report_json();
    printf("%s %s\n", tag, report ? report : "null");
    interheap_allocator_free_string(report);
}

#endif
