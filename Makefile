# `make demo` runs the main job, `make test` the tests; both build .venv first (tools/setup_venv.sh):
# the demo only what it needs, the tests (and `make setup`) everything, in the same venv.
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup setup-demo test demo bench clean

setup:
	@bash tools/setup_venv.sh

setup-demo:
	@bash tools/setup_venv.sh demo

# The tests run in parallel: a worker per core, at most 4 (each worker's servers and Spark sessions
# take memory), each file on one worker, the slowest files first (tests/conftest.py orders them).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n > 4 ? 4 : n )))

# The venv's bin goes first on PATH: servers the tests start (mlflow, uvicorn, azmlinfsrv) run from it.
test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder --durations=25

# The main job, offline: synthetic data -> fine-tune -> evaluate -> register -> serve -> Azure
# entry scripts -> batch scoring, all under outputs/demo (steps whose inputs did not change are
# reused). DEMO_ARGS passes options through, e.g. DEMO_ARGS="--num-images 100".
demo: setup-demo
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m mmdet_mlflow.cli demo --output outputs/demo $(DEMO_ARGS)

# Benchmarks print ratios against a baseline run in the same process (not tests).
bench: setup
	$(PY) bench/predict.py
	$(PY) bench/evaluate.py
	$(PY) bench/finetune.py --part a

clean:
	rm -rf outputs .pytest_cache
