# Two set-up commands for a fresh machine with Python 3.11 and pip:
#   make demo   - create .venv if missing, install, `openrelease init demo` (the project users
#                 get), then run its tiny pipeline end to end (dvc repro)
#   make test   - create .venv if missing, install, lint, type-check and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: demo test lint pytest slow golden clean-artifacts

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "openrelease needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	@touch $(STAMP)

DEMO := demo

demo: $(STAMP)
	@test -d $(DEMO) || $(BIN)/openrelease init $(DEMO) --recipe tiny
	cd $(DEMO) && openrelease pipeline sync && dvc repro
	@cd $(DEMO) && openrelease summary

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: $(STAMP)
	$(BIN)/pytest -m "not gpu"

test: lint pytest

slow: $(STAMP)
	$(BIN)/pytest -m "slow"

golden: $(STAMP)
	OPENRELEASE_GOLDEN=1 $(BIN)/pytest -m "golden"

clean-artifacts:
	rm -rf $(DEMO)
