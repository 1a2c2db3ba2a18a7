# Citadel's entry points. `make demo` runs the main job, `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CITADEL_CACHE ?= $(HOME)/.cache/citadel
# The folder operator/ in the repository root would shadow the standard-library
# module `operator` for any `python -m`/`python -c` started here: never put the
# current directory on sys.path.
export PYTHONSAFEPATH := 1
HARNESS := PYTHONPATH=tests/e2e $(PY) -m harness
# Warnings are errors in tests (pyproject.toml); the venv is rebuilt when
# pyproject.toml changes.
VENV_STAMP := $(VENV)/.installed

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

.PHONY: venv
venv: $(VENV_STAMP) ## Create the Python environment (.venv)

.PHONY: proto
proto: venv ## Regenerate gateway/rpc/v1 from proto/ (committed; `make unit` fails when stale)
	$(PY) proto/generate.py

.PHONY: fmt
fmt: venv ## Format the code in place
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

.PHONY: lint
lint: venv ## ruff format check, ruff lint, mypy --strict, import layering
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	# mypy runs from src/ so that the folder operator/ never shadows the
	# standard-library module of that name.
	cd src && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p citadel
	$(VENV)/bin/mypy --config-file pyproject.toml tests/e2e/harness
	$(VENV)/bin/mypy --config-file pyproject.toml bench/citadel_bench bench/simulator
	$(VENV)/bin/lint-imports --config .importlinter

# The chart's template tests need helm: `make unit` builds it alone (from its Go
# module, a few minutes once, then cached), not the whole cluster.
HELM := $(CITADEL_CACHE)/bin/helm
$(HELM):
	bash tests/e2e/cluster/build.sh helm

.PHONY: unit
unit: venv $(HELM) ## Unit tests (no cluster, no network)
	$(VENV)/bin/pytest -m unit tests/unit

.PHONY: dashboards
dashboards: venv ## Regenerate the chart's Grafana dashboards from charts/dashboards.py
	$(PY) charts/dashboards.py

.PHONY: chart-docs
chart-docs: venv ## Regenerate the values reference in docs/install.md from the schema
	$(PY) charts/values_reference.py

.PHONY: crds
crds: venv ## Generate crds/ and docs/reference/llmmodel.md from operator/spec.py
	$(PY) -m citadel.operator.generate .

.PHONY: binaries
binaries: ## Build the cluster binaries from Go modules (cached in $CITADEL_CACHE)
	bash tests/e2e/cluster/build.sh

.PHONY: cluster-up
cluster-up: venv ## Start the local cluster and make context citadel-local current
	$(HARNESS) up

.PHONY: cluster-down
cluster-down: venv ## Stop the local cluster, leaving no process behind
	$(HARNESS) down

.PHONY: cluster-reset
cluster-reset: venv ## Stop the local cluster and delete its data
	$(HARNESS) reset

.PHONY: e2e
e2e: venv vllm binaries ## End-to-end tests against the cluster (local harness unless CITADEL_E2E_KUBECONFIG is set)
	$(VENV)/bin/pytest -m e2e tests/e2e

.PHONY: integration
integration: venv ## Integration tests: gateway, fake backends and redis as local processes
	$(VENV)/bin/pytest -m integration tests/gateway

.PHONY: e2e-gateway
e2e-gateway: venv binaries ## The gateway against the cluster: ConfigMap, EndpointSlices, key Secrets
	$(VENV)/bin/pytest -m e2e tests/gateway/kubernetes

.PHONY: test
test: lint unit integration vllm-test vllm-gateway e2e e2e-gateway ## Everything: lint, types, unit, integration, real vLLM and e2e tests

.PHONY: demo
demo: venv binaries ## The main job: cluster, chart, a real model answering through the gateway
	PYTHONPATH=tests/e2e $(PY) -m harness.demo up

.PHONY: demo-down
demo-down: venv ## Remove the demo and stop the local cluster
	PYTHONPATH=tests/e2e $(PY) -m harness.demo down

# The benchmarks' own tools (matplotlib, py-spy) come from the `bench` extra; the
# peers (vllm-router, LiteLLM) get venvs of their own under $CITADEL_CACHE/bench.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(VENV_STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	@touch $@

.PHONY: bench
# The scale part needs the local cluster and the check part the CPU vLLM, so both
# are brought in here: a fresh checkout gets the whole document, not rows saying
# "not measured". cluster-up builds the binaries it lacks and leaves the cluster
# running, as the e2e tests leave it.
bench: $(BENCH_STAMP) vllm cluster-up ## Benchmarks against the peers, ~30 min (BENCH_QUICK=1: a few); writes docs/benchmarks.md
	bash bench/peers/install.sh
	PYTHONPATH=bench $(PY) -m citadel_bench --out docs

.PHONY: vllm
vllm: ## Install the CPU vLLM and its test models (cached in $CITADEL_CACHE)
	bash tests/support/vllm/install.sh

.PHONY: vllm-test
vllm-test: venv vllm ## Smoke tests against the real CPU vLLM
	$(VENV)/bin/pytest -m vllm tests/vllm

.PHONY: vllm-gateway
vllm-gateway: venv vllm ## The gateway in front of the real CPU vLLM, with the openai client
	$(VENV)/bin/pytest -m vllm tests/gateway/vllm
