# interheap: the two commands a fresh machine needs are `make demo` and `make test`.
.PHONY: setup demo test bench bench-instructions bench-adapters fmt clean

PYTHON := .venv/bin/python

setup:
	scripts/setup.sh

# The main job: four isolated subinterpreters in parallel threads, under the hooks.
demo: setup
	@mkdir -p out
	$(PYTHON) -m interheap run --json out/demo.json examples/parallel_interpreters.py

# Every check and test, on every interpreter of the matrix (3.12, 3.13, 3.13t).
test: setup
	scripts/test.sh

# pyperformance, interleaved: no hooks vs interheap's hooks vs tracemalloc.
bench: setup
	$(PYTHON) -m pip install -q --disable-pip-version-check pyperformance
	$(PYTHON) bench/pyperformance_hooks.py $(BENCH_ARGS)

# Instructions the hooks add per allocation + free pair (callgrind, repeatable).
bench-instructions: setup
	$(PYTHON) bench/hook_instructions.py

# Instructions per allocator call: a legacy allocator bare, behind the lock
# wrapper (unlocked and locked), and with the thread-safe flag (callgrind).
bench-adapters: setup
	$(PYTHON) bench/adapter_instructions.py $(BENCH_ARGS)

fmt:
	cargo fmt --all
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean:
	rm -rf .venv .venvs .venvs.list out target
