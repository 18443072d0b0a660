# Two entry points for a fresh machine: `make demo` and `make test` (each sets up the runtime on first use).
PY := .venv/bin/python

.PHONY: setup test demo bench clean-cache gpu-prepare gpu-check

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

# the GPU checks (README, Development > GPU): gpu-prepare here builds .gpu/ and prints the device tool's call;
# gpu-check is what runs on the lent GPU machine (ARGS="--dry-run" checks its CPU-side parts anywhere)
gpu-prepare: setup
	bash scripts/gpu_prepare.sh

gpu-check:
	bash scripts/gpu_check.sh $(ARGS)
