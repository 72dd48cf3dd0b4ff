# `make run` and `make test` build .venv on first use and re-install when
# requirements-dev.txt or any pyproject.toml changes (stamp file).
VENV := .venv
STAMP := $(VENV)/.installed
PYPROJECTS := $(shell find . -name pyproject.toml -not -path './.venv/*' -not -path './.git/*')

.PHONY: run test lint install

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
