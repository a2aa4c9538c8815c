# Every target sets up what it needs: a virtualenv with the pinned dependencies, re-installed
# only when pyproject.toml changes, and any Debian package a target needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AIAAS := $(BIN)/aiaas
CLUSTER ?= configs/cluster/local.yaml

# No internet here, and a stray address or auth setting must not leak into our processes.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
unexport RAY_ADDRESS RAY_API_SERVER_ADDRESS

.PHONY: demo test lint bench down install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(AIAAS) validate configs/cluster/*.yaml
	$(AIAAS) cluster up $(CLUSTER)
	$(AIAAS) cluster status $(CLUSTER)
	$(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.node_report
	$(AIAAS) data prepare configs/data/digits.yaml --cluster $(CLUSTER)
	$(AIAAS) train configs/train/digits_mlp.yaml --cluster $(CLUSTER) --follow
	$(AIAAS) jobs list --cluster $(CLUSTER)
	@echo
	@echo "Ray dashboard:   http://127.0.0.1:8265"
	@echo "MLflow registry: http://127.0.0.1:5000"
	@echo "Stop everything: make down"

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m bench

down: $(STAMP)
	$(AIAAS) cluster down $(CLUSTER)

clean: down
	rm -rf $(VENV)
