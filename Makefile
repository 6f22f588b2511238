# Set-up and entry points. `make train` and `make test` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build on machines without a GPU; on a GPU machine use e.g. `make TORCH_SPEC=torch==2.11.0 ...`
TORCH_SPEC ?= torch==2.13.0
PIP_SPEC ?= pip==26.3
# Exact versions of every other package for the CPU test environment (the one CI uses), so a test's
# verdict does not depend on the day it was installed. It applies with the default TORCH_SPEC only:
# another torch brings its own triton, so `make TORCH_SPEC=...` resolves setup.py's ranges instead.
LOCK ?= $(if $(filter torch==2.13.0,$(TORCH_SPEC)),requirements/lock-cpu.txt,)
STAMP := $(VENV)/.installed
CONFIG ?= examples/configs/tiny.yaml
DATA ?= data/synthetic
PYTEST_ARGS ?=

.PHONY: install lock data train test bench clean

$(STAMP): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(PIP_SPEC)"
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Re-resolve setup.py's ranges in a scratch environment and rewrite the lock (review the diff, run make test).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q "$(PIP_SPEC)" && .lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e ".[dev]"
	{ sed -n '1,/^[^#]/{/^#/p}' requirements/lock-cpu.txt; \
	  .lock-venv/bin/pip freeze | grep -v -E '^(-e |# Editable|torch==)'; } > requirements/lock-cpu.txt.new
	mv requirements/lock-cpu.txt.new requirements/lock-cpu.txt && rm -rf .lock-venv

data: $(STAMP)
	@if [ ! -f $(DATA)/meta.json ]; then $(BIN)/python tools/make_synthetic_data.py --out $(DATA); fi

train: data
	$(BIN)/python -m engine.train --config $(CONFIG)
	$(BIN)/python tools/plot_metrics.py runs/tiny

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(BIN)/python tools/bench_kernels.py

clean:
	rm -rf runs $(DATA) .pytest_cache .lock-venv
