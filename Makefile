# `make demo` runs the main job, `make test` the tests; both build .venv first (tools/setup_venv.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup test demo bench clean

setup:
	@bash tools/setup_venv.sh

# The venv's bin goes first on PATH: servers the tests start (mlflow, uvicorn, azmlinfsrv) run from it.
test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests

# Until the end-to-end demo lands: package a checkpoint you give and serve it.
#   make demo CHECKPOINT=path/or/url/or/official [CONFIG=rtmdet-ins_tiny_8xb32-300e_coco]
CONFIG ?= rtmdet-ins_tiny_8xb32-300e_coco
demo: setup
	@if [ -z "$(CHECKPOINT)" ]; then \
	  echo "make demo: give a checkpoint: make demo CHECKPOINT=PATH|URL|official [CONFIG=$(CONFIG)]"; \
	  echo "  (official downloads the published COCO weights, which needs network access)"; exit 2; fi
	rm -rf outputs/demo-model
	$(VENV)/bin/mmdet-mlflow package --config $(CONFIG) --checkpoint $(CHECKPOINT) --output outputs/demo-model
	$(VENV)/bin/mlflow models serve -m outputs/demo-model --env-manager local -h 127.0.0.1 -p 5000

bench: setup
	$(PY) bench/predict.py
	$(PY) bench/evaluate.py

clean:
	rm -rf outputs .pytest_cache
