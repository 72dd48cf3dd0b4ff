# `make run` and `make test` build .venv on first use and re-install when
# requirements-dev.txt or any pyproject.toml changes (stamp file).
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

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(STAMP): requirements-dev.txt $(PYPROJECTS) | $(VENV)/bin/python
	$(VENV)/bin/pip install -r requirements-dev.txt
	touch $(STAMP)

# Every benchmark, one after the other, each printing its figures (docs/benchmarks.md).
# Needs the same servers as the tests; takes several minutes on 2 cores.
BENCHMARKS := bus_throughput state_store simulator_generate feed_ingest replay_memory \
	features activity_replay worker_pool scaling

bench: $(STAMP)
	@set -e; for b in $(BENCHMARKS); do \
		echo "=== benchmarks/$$b.py"; $(VENV)/bin/python benchmarks/$$b.py; done
