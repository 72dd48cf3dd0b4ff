# `make run` and `make test` build .venv on first use and re-install when
# requirements/dev.lock or any pyproject.toml changes (stamp file): exactly the locked
# versions (pip --require-hashes), then the workspace's own packages, editable, without
# dependencies and built by the locked hatchling. `make lock` refreshes the locks.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := requirements/dev.lock
PYPROJECTS := $(shell find . -name pyproject.toml -not -path './.venv/*' -not -path './.git/*')
# the workspace's packages: the `-e` lines of requirements/dev.in
WORKSPACE := $(shell sed -n 's/^-e //p' requirements/dev.in)

.PHONY: run test lint install lock bench

run: $(STAMP)
	$(VENV)/bin/pumpflow run

# The suite on two workers (pytest-xdist), each a test session of its own (its RabbitMQ
# vhost; every test its namespace): most tests wait on the servers or on processes, so
# two share the 2 cores. A file's tests run in one worker, in their order. Then the tests
# marked `alone` (a pace that needs a core of their own), in one process.
# TEST_WORKERS=0 runs the first part in one process too.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile -m "not fault and not alone"
	$(VENV)/bin/pytest -m alone

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

install: $(STAMP)

# bin/pip, not bin/python: a venv whose creation failed (no ensurepip) has a python
# but no pip, and must be created again on the next run
$(VENV)/bin/pip:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "pumpflow needs Python 3.11 or later: make PYTHON=python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The lock pins pip too: the first install also brings .venv's pip (23.x in a new venv)
# to the locked version.
$(STAMP): $(LOCK) $(PYPROJECTS) | $(VENV)/bin/pip
	$(VENV)/bin/pip install --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --no-deps --no-build-isolation $(addprefix -e ,$(WORKSPACE))
	$(VENV)/bin/pip check
	touch $(STAMP)

# Re-compile requirements/*.lock from requirements/*.in and the pyproject.toml files
# with the locked pip-tools (scripts/lock.py). LOCK_ARGS=--upgrade moves every pin to
# the newest release, LOCK_ARGS="--upgrade-package NAME" one of them.
lock: | $(VENV)/bin/pip
	$(VENV)/bin/pip install --quiet --require-hashes -r $(LOCK)
	$(VENV)/bin/python scripts/lock.py $(LOCK_ARGS)

# Every benchmark, one after the other, each printing its figures (docs/benchmarks.md).
# Needs the same servers as the tests; takes several minutes on 2 cores.
BENCHMARKS := bus_throughput state_store simulator_generate simulator_calibration \
	feed_ingest replay_memory features activity_replay worker_pool scaling pipeline \
	services_distributed model_scoring model_service token_churn fuzz_decoder graceful_exit exit_latency \
	backtest

bench: $(STAMP)
	@set -e; for b in $(BENCHMARKS); do \
		echo "=== benchmarks/$$b.py"; $(VENV)/bin/python benchmarks/$$b.py; done
