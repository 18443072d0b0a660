# Two entry points for a fresh machine: `make demo` and `make test` (each sets up the runtime on first use).
PY := .venv/bin/python

.PHONY: setup test demo bench clean-cache

setup:
	bash scripts/setup_runtime.sh

# extra pytest arguments: make test ARGS="-k zoo -x"
test: setup
	$(PY) -m pytest $(ARGS)

demo: setup
	$(PY) scripts/demo.py $(ARGS)

# performance benchmark (not part of `make test`): make bench ARGS="--quick" or ARGS="--device cuda"
bench: setup
	$(PY) bench/run_bench.py $(ARGS)

# synthetic model zoo and subspace caches; rebuilt on demand
clean-cache:
	rm -rf .cache
