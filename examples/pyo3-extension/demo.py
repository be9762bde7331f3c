"""What Python's tools see of a Rust extension's memory.

python examples/pyo3-extension/demo.py                      # tracemalloc's view
python -m interheap run examples/pyo3-extension/demo.py     # and interheap's, at exit
"""

import tracemalloc

import interheap_example_ext as ext

MiB = 1024 * 1024

tracemalloc.start()
t0 = tracemalloc.get_traced_memory()[0]
buf = ext.RustBuffer(50 * MiB)  # a 50 MiB Vec<u8>, allocated by Rust code
t1 = tracemalloc.get_traced_memory()[0]
print(f"tracemalloc: {(t1 - t0) / MiB:+.1f} MiB after RustBuffer(50 MiB)")
print(f"  largest allocation site: {tracemalloc.take_snapshot().statistics('lineno')[0]}")
keep = ext.RustBuffer(8 * MiB)  # still alive at exit: interheap's report shows it
buf.free()
print(f"tracemalloc: {(tracemalloc.get_traced_memory()[0] - t0) / MiB:+.1f} MiB after free()")
stats = ext.allocator_stats()
print(
    f"allocator: {stats['python']['live_bytes'] / MiB:.1f} MiB live through Python, "
    f"{stats['fallback']['live_bytes'] / MiB:.1f} MiB around it"
)
