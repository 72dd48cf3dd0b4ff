# `make run` and `make test` build .venv on first use and re-install when
# requirements-dev.txt or any pyproject.toml changes (stamp file).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PYPROJECTS := $(shell find . -name pyproject.toml -not -path './.venv/*' -not -path './.git/*')

.PHONY: run test lint install bench

run: $(STAMP)
	$(VENV)/bin/pumpflow run

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

install: $(STAMP)

# bin/pip, not bin/python: a venv whose creation failed (no ensurepip) has a python
# but no pip, and must be created again on the next run
$(VENV)/bin/pip:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "pumpflow needs Python 3.11 or later: make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements-dev.txt $(PYPROJECTS) | $(VENV)/bin/pip
	$(VENV)/bin/pip install -r requirements-dev.txt
	touch $(STAMP)

# Every benchmark, one after the other, each printing its figures (docs/benchmarks.md).
# Needs the same servers as the tests; takes several minutes on 2 cores.
BENCHMARKS := bus_throughput state_store simulator_generate feed_ingest replay_memory \
	features activity_replay worker_pool scaling

bench: $(STAMP)
	@set -e; for b in $(BENCHMARKS); do \
		echo "=== benchmarks/$$b.py"; $(VENV)/bin/python benchmarks/$$b.py; done
