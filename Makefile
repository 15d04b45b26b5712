# One entry point. `make demo`: set up and run the demo grid + report (writes results/demo).
# `make test`: set up and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that the machines of this project serve from local disk
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo report bench device-check clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not slurm and not browser"

demo: $(STAMP)
	$(PY) -m study launch grids/demo.yaml --executor local
	$(PY) -m study report grids/demo.yaml --out results/demo

report: $(STAMP)
	$(PY) -m study report grids/demo.yaml --out results/demo

bench: $(STAMP)
	$(PY) -m benchmarks

# needs CUDA (exits 2 with one line without it); writes benchmarks/device.md. CPU rot check: --smoke
device-check: $(STAMP)
	$(PY) -m benchmarks.device

clean-runs:
	rm -rf mlflow.db mlartifacts checkpoints submitit
