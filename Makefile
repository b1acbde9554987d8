# polyak development tasks. `make test` sets everything up on a fresh machine and runs every test.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned for development: this version's CPU wheel is on local disk. pyproject.toml
# declares only the minimum that users need.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# Extra flags for `polyak demo`, e.g. make demo DEMO_ARGS="--seed 1 --out docs/figures"
DEMO_ARGS ?=

.PHONY: install test lint bench bench-checkpoints clean demo

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test,demo]" $(TORCH)
	touch $(STAMP)

# `make demo` installs only what the demo needs (the demo extra), not the test extras.
$(DEMO_STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[demo]" $(TORCH)
	touch $(DEMO_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Results go to bench-results/ (JSON and a PNG of the ratios; not committed).
bench: $(STAMP)
	mkdir -p bench-results
	$(PY) benchmarks/update_speed.py --json bench-results/update_speed.json --png bench-results/update_speed.png
	$(PY) benchmarks/update_breakdown.py
	$(PY) benchmarks/precision.py
	$(PY) benchmarks/health.py

# Averaging three 2.2 GB sharded checkpoints: peak memory and time, mergekit beside (about 2 min,
# 12 GB of disk under /tmp; not part of `make test`). mergekit lives in a venv of its own.
MERGE_VENV := .venv-merge
$(MERGE_VENV)/.installed: pyproject.toml Makefile
	test -x $(MERGE_VENV)/bin/python || $(PYTHON) -m venv $(MERGE_VENV)
	$(MERGE_VENV)/bin/python -m pip install -q $(TORCH)
	$(MERGE_VENV)/bin/python -m pip install -q "mergekit>=0.1.5" $(TORCH)
	touch $@

bench-checkpoints: $(STAMP) $(MERGE_VENV)/.installed
	$(PY) benchmarks/checkpoint_average.py --mergekit-python $(MERGE_VENV)/bin/python

demo: $(DEMO_STAMP)
	$(VENV)/bin/polyak demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(MERGE_VENV) bench-results build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
