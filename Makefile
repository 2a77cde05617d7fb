# tipslab: `make demo` and `make test` each do their own set-up (venv in .venv/, pinned stack).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= tipsv2_tiny
ARGS ?=
RUNS ?= runs
MLFLOW_URI ?= sqlite:///$(abspath $(RUNS))/mlflow.db
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint train mlflow-ui bench clean

setup: $(STAMP)

# Re-install only when the project's requirements change; a second call returns in seconds.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would download a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(PY) -m tipslab.platform.demo --runs $(RUNS)

test: setup
	$(PY) -m pytest -q --timeout 900 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check .

train: setup
	$(VENV)/bin/tipslab train $(EXP) $(ARGS)

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_URI) \
		--host 127.0.0.1 --port 5000 --workers 1

bench: setup
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_search.py --sizes 102400
	$(PY) bench/bench_extract.py

clean:
	rm -rf $(RUNS) .pytest_cache build *.egg-info
