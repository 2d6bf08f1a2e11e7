# One-command set-up: a local .venv with the CPU build of torch pinned first, then cpal.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The built-in data fits in 400 optimizer steps; configs/demo.yaml's 1000 are for harder
# small datasets (docs/results.md). The whole chain then stays under 15 minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/cpal run configs/demo.yaml train.steps=400

test: $(STAMP)
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check src tests benchmarks

# The inner loop: everything but the multi-process and end-to-end tests (see pyproject's markers).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not distributed"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs
