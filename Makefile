# Set-up and entry points. `make train` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build on machines without a GPU; on a GPU machine use e.g. `make TORCH_SPEC=torch==2.11.0 ...`
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
CONFIG ?= examples/configs/tiny.yaml
DATA ?= data/synthetic
PYTEST_ARGS ?=

.PHONY: install data train test bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	@if [ ! -f $(DATA)/meta.json ]; then $(BIN)/python tools/make_synthetic_data.py --out $(DATA); fi

train: data
	$(BIN)/python -m engine.train --config $(CONFIG)
	$(BIN)/python tools/plot_metrics.py runs/tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python tools/bench_kernels.py

clean:
	rm -rf runs $(DATA) .pytest_cache
