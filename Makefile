# make demo: the quickstart on the embedded digits model.  make test: lint, types, tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-ray lint types bench bench-counts bench-bulk bench-server bench-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[cpu,demo]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.demo
	cd examples && ../$(BIN)/python quickstart.py && ../$(BIN)/python canary_rollout.py

lint: $(VENV)/.dev
	$(BIN)/ruff check inferkit tests examples benchmarks
	$(BIN)/ruff format --check inferkit tests examples benchmarks

types: $(VENV)/.dev
	$(BIN)/mypy

test: lint types
	$(BIN)/pytest -q

# Opt-in: Ray (about 80 MB of wheels) is kept out of the dev extra; its tests skip without it.
test-ray: $(VENV)/.dev
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	$(BIN)/pytest -q -m ray tests/test_integrations_ray.py

bench: $(VENV)/.dev
	$(BIN)/python -m pip install -q batched
	$(BIN)/python benchmarks/bench_batching.py

# Deterministic: Python bytecodes per request on each path (and valgrind's instructions when installed).
bench-counts: $(VENV)/.dev
	$(BIN)/python benchmarks/hot_path.py --top 12 --callgrind

# Opt-in, installs the ray extra as test-ray does: predictor.map against the model's own batched throughput
# and Ray Data, and inferkit's Ray Serve deployment against @serve.batch (about two minutes).
bench-bulk: $(VENV)/.dev
	$(BIN)/python -m pip install -q -e '.[dev,ray]'
	$(BIN)/python benchmarks/bench_bulk.py $(BENCH_BULK_ARGS)

# Opt-in: installs wrk and the peers' own venvs (.venv-pytriton, .venv-litserve); never part of make test.
bench-server: $(VENV)/.dev
	PYTHON=$(PYTHON) benchmarks/server/setup_peers.sh
	$(BIN)/python benchmarks/server/bench_server.py $(BENCH_SERVER_ARGS)

# Opt-in, on a GPU machine with CuPy and onnxruntime-gpu in the venv (docs/gpu.md: installing onnxruntime-gpu
# beside the dev extra's onnxruntime breaks both, so it is not installed here). Without a GPU it says so and exits 0.
bench-gpu: $(VENV)/.dev
	$(BIN)/python benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
