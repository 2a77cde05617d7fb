# tipslab: `make demo` and `make test` each do their own set-up (venv in .venv/, pinned stack).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= tipsv2_tiny
ARGS ?=
# Multi-GPU / multi-node training through torchrun (experiments/slurm_train.sh under SLURM):
# run `make train EXP=tipsv2_b NODES=2 GPUS=8 RUN=b-try1 MASTER_ADDR=node0` on every node.
NODES ?= 1
GPUS ?= 1
RUN ?=
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
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

# One process: the plain command. More: torchrun starts GPUS processes per node and the nodes meet
# at MASTER_ADDR:MASTER_PORT; every process must name the same run folder, hence RUN (TIPSLAB_RUN_NAME).
train: setup
ifeq ($(NODES)$(GPUS),11)
	$(VENV)/bin/tipslab train $(EXP) $(ARGS)
else
	@test "$(NODES)" = 1 || test -n "$(RUN)" || { echo "make train: NODES=$(NODES) needs RUN=<run name>, the same on every node" >&2; exit 2; }
	TIPSLAB_RUN_NAME=$(if $(RUN),$(RUN),$$(date -u +%Y%m%d-%H%M%S)); export TIPSLAB_RUN_NAME; \
	$(VENV)/bin/torchrun --nnodes=$(NODES) --nproc-per-node=$(GPUS) --rdzv-backend=c10d \
		--rdzv-endpoint=$(MASTER_ADDR):$(MASTER_PORT) --rdzv-id=$$TIPSLAB_RUN_NAME \
		-m tipslab.platform.cli train $(EXP) trainer.devices=$(GPUS) trainer.num_nodes=$(NODES) $(ARGS)
endif

mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_URI) \
		--host 127.0.0.1 --port 5000 --workers 1

bench: setup
	$(PY) bench/bench_train_step.py
	$(PY) bench/bench_search.py --sizes 102400
	$(PY) bench/bench_extract.py

clean:
	rm -rf $(RUNS) .pytest_cache build *.egg-info
