# interheap: the two commands a fresh machine needs are `make demo` and `make test`.
.PHONY: setup demo test wheel bench bench-sites bench-check bench-instructions bench-threads bench-allocator bench-allocator-run bench-allocator-instructions bench-allocator-callgrind bench-scaling bench-pyalloc bench-adapters fuzz regrtest torture fmt clean

PYTHON := .venv/bin/python

setup:
	scripts/setup.sh

# The main job: four isolated subinterpreters in parallel threads, under the hooks,
# with sampled sites and the timeline; out/demo.html is the report to open.
# Prepares only what it runs on: the default interpreter (3.14), .venv, interheap.
demo:
	scripts/setup.sh --demo
	@mkdir -p out
	$(PYTHON) -m interheap run --sites --timeline --json out/demo.json --html out/demo.html examples/parallel_interpreters.py
	@echo "demo: the report to open in a browser is out/demo.html (figures: out/demo.json)"

# Every check and test, on every interpreter of the matrix (3.12, 3.13, 3.14, 3.14t).
test: setup
	scripts/test.sh

# The wheel for .venv's interpreter, into dist/: the package, its CLI and the
# interheap-python launcher (built by frontends/python/build.rs). Install it
# anywhere with `pip install dist/interheap-*.whl`. The Cargo target dir is the
# one setup.sh used for that interpreter, so this takes seconds after setup.
wheel: setup
	cd frontends/python && CARGO_TARGET_DIR="$${INTERHEAP_CACHE:-$$HOME/.cache/interheap}/target/$$(../../$(PYTHON) -c 'import sys, sysconfig; print("%d.%d%s" % (*sys.version_info[:2], "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""))')" \
		PYO3_PYTHON=$(CURDIR)/$(PYTHON) ../../.venv/bin/maturin build --release -i $(CURDIR)/$(PYTHON) --out $(CURDIR)/dist

# pyperformance, interleaved: no hooks vs interheap's hooks vs tracemalloc.
bench: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_hooks.py $(BENCH_ARGS)

# What sampling allocation sites (--sites) and the timeline (--timeline) add to the hooks, interleaved.
bench-sites: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_hooks.py --configs none,hooks,sites,timeline $(BENCH_ARGS)

# What the checking hooks (python -m interheap check) cost against the hooks and against PYTHONMALLOC=debug, interleaved.
bench-check: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_hooks.py --configs none,hooks,check,debug --vs hooks $(BENCH_ARGS)

# Instructions the hooks add per allocation + free pair (callgrind, repeatable): a C loop
# over pymalloc, mimalloc and the interheap allocator, side by side; then a Python loop,
# with a limit set and with sites sampled.
bench-instructions: setup
	$(PYTHON) bench/allocator_instructions.py --hooks
	$(PYTHON) bench/hook_instructions.py --limited --sites

# Free-threaded 3.14t: 8 threads allocating at once, with and without the hooks, interleaved
# (the hooks' scaling over the scaling without them).
bench-threads: setup
	$$(awk '$$1 == "3.14t" { print $$2 "/bin/python" }' .venvs.list) bench/thread_scaling.py $(BENCH_ARGS)

# The interheap allocator (interheap-python) vs pymalloc vs CPython's mimalloc, interleaved.
bench-allocator: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_hooks.py --configs none,mimalloc,interheap $(BENCH_ARGS)

# What `interheap-python -m interheap run` costs over interheap-python (figures from the heaps,
# no hooks), and the hooks over pymalloc, interleaved.
bench-allocator-run: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_hooks.py --configs none,hooks,interheap,interheap-run --vs interheap $(BENCH_ARGS)

# Instructions per PyObject_Malloc(32) + PyObject_Free pair: pymalloc, mimalloc, interheap (callgrind).
bench-allocator-instructions: setup
	$(PYTHON) bench/allocator_instructions.py
	$(PYTHON) bench/allocator_instructions.py --domain raw

# pyperformance by instruction count (callgrind, repeatable): pymalloc vs mimalloc vs interheap.
bench-allocator-callgrind: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_instructions.py $(BENCH_ARGS)

# Throughput of 2 isolated interpreters in parallel against 1: interheap-python, then pymalloc.
bench-scaling: setup
	.venv/bin/interheap-python bench/interpreter_scaling.py $(BENCH_ARGS)
	$(PYTHON) bench/interpreter_scaling.py $(BENCH_ARGS)

# Fuzz the engine (engine/fuzz, cargo fuzz, nightly): the allocator (heap_ops) and the
# hooks' bookkeeping (tracker_ops), FUZZ_SECONDS=60 each, corpus kept in the cache.
fuzz: setup
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

# CPython's own regression tests under interheap-python (also part of make test).
regrtest: setup
	scripts/regrtest.sh

# Memory limits under torture: CPython's test_json, test_re, test_list and
# test_str/test_unicode and 8 pyperformance workloads in a limited
# subinterpreter, 7 limits from 512 KB to 256 MB, hooks and allocator.
torture: setup
	$(PYTHON) tests/limit_torture.py --json out/limit-torture.json $(TORTURE_ARGS)

# The Rust global allocator (interheap-pyalloc): ns and instructions per
# allocation + free pair against Rust's system allocator, side by side.
bench-pyalloc: setup
	PYO3_PYTHON=$(CURDIR)/$(PYTHON) \
	LD_LIBRARY_PATH="$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')" \
	CARGO_TARGET_DIR="$${INTERHEAP_CACHE:-$$HOME/.cache/interheap}/target/checks" \
		cargo bench -p interheap-pyalloc --bench pairs

# Instructions per allocator call: a legacy allocator bare, behind the lock
# wrapper (unlocked and locked), and with the thread-safe flag (callgrind).
bench-adapters: setup
	$(PYTHON) bench/adapter_instructions.py $(BENCH_ARGS)

fmt:
	cargo fmt --all
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean:
	rm -rf .venv .venvs .venvs.list out target dist frontends/python/wheel-data/scripts/interheap-python-bin
