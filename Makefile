# mlflow-dspy: `make demo` on a fresh machine, `make test` for the suite.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PY := $(BIN)/python
PORT ?= 6000
UI_PORT ?= 5000
PROGRAM ?= qa
GATEWAY_PORT ?= 8000
WORKERS ?= 1
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
# Offline, litellm's import tries to fetch a model-price map, fails, and its
# logging filter can then deadlock on an import lock: `mlflow ui` hung at
# start-up that way here. The bundled map is enough.
export LITELLM_LOCAL_MODEL_COST_MAP ?= true
# `mlflow models serve` starts uvicorn by name: the venv's bin must be on PATH.
export PATH := $(BIN):$(PATH)

# llama-cpp-python ships only as source. A native build picks AVX-512/AMX
# paths that segfault on these machines, and pip's cache would hand such a
# wheel back forever, so the wheel is built once, without native flags and
# without pip's cache, into a wheelhouse of its own: from the sdist whose
# SHA-256 the lock holds (--require-hashes), and the built wheel's own SHA-256
# is recorded beside it. A local build has no hash on PyPI, so `install` puts
# it in by itself, after checking that record, and the lock's hashed install
# then finds it already there (README, Install).
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
WHEELHOUSE ?= $(HOME)/.cache/mlflow-dspy/wheelhouse
export WHEELHOUSE
LLAMA_STAMP := $(WHEELHOUSE)/.llama-cpp-python-$(LLAMA_VERSION)-nonative
LLAMA_WHEEL = $(wildcard $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl)
LLAMA_RECORD := $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION).sha256

RUN_ID ?= $(shell $(PYTHON) -c "import json;print(json.load(open('.last_run.json'))['run_id'])" 2>/dev/null)

.PHONY: install wheels browser lock audit dist log model-uri serve gateway docker ui curl demo flywheel test test-fast lint bench soak clean stack stack-down stack-status stack-deps

install: $(VENV)/.installed

# Every byte checked: first the lock's pip, by its hash (the pip a venv starts with,
# 23.2, refuses a hashed lock in which a package asks for another's extras); then
# the llama-cpp-python wheel built here, against the SHA-256 recorded when it was
# built; then the lock, hash-checked
# (--require-hashes: every file pip fetches must match a hash of the lock, and
# every package must be in it); then this checkout itself, editable, without
# dependencies and without build isolation (its build backend, setuptools, came
# with the lock): `import mlflow_dspy` is this checkout's code, and
# .venv/bin/mlflow-dspy exists beside `python mlflow_dspy.py`.
$(VENV)/.installed: requirements.txt mlflow_dspy/requirements.txt requirements-dev.txt requirements.in pyproject.toml \
		$(LLAMA_RECORD)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) scripts/lock.py --entry pip > $(VENV)/pip.lock
	$(PY) -m pip install --require-hashes -r $(VENV)/pip.lock
	cd $(WHEELHOUSE) && sha256sum --check --strict --quiet $(LLAMA_RECORD)
	$(PY) -m pip install --no-deps --no-index $(LLAMA_WHEEL)
	$(PY) -m pip install --require-hashes -r requirements-dev.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

# The package's copy of the lock (what a logged model declares), generated from
# the top-level one; tests/test_pins.py checks that the two are the same.
mlflow_dspy/requirements.txt: requirements.txt
	cp requirements.txt $@

wheels: $(LLAMA_RECORD)

$(LLAMA_STAMP):
	mkdir -p $(WHEELHOUSE)
	$(PYTHON) scripts/lock.py --entry llama-cpp-python > $(WHEELHOUSE)/llama-cpp-python.lock
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel --no-deps --no-cache-dir --require-hashes \
		-w $(WHEELHOUSE) -r $(WHEELHOUSE)/llama-cpp-python.lock
	touch $@
	cd $(WHEELHOUSE) && sha256sum llama_cpp_python-$(LLAMA_VERSION)-*.whl > $(LLAMA_RECORD)

# A wheelhouse from before the record existed: its wheel is recorded as it is
# now (trusted on first use); delete the wheelhouse to rebuild from the checked sdist.
$(LLAMA_RECORD): $(LLAMA_STAMP)
	test -s $@ || { echo "recording the SHA-256 of the llama-cpp-python wheel built earlier in $(WHEELHOUSE)"; \
		cd $(WHEELHOUSE) && sha256sum llama_cpp_python-$(LLAMA_VERSION)-*.whl > $@; }

# The team stack's parts from Debian (README, Past one machine): HAProxy, and Prometheus if it installs
# cleanly (the stack runs without it and leaves its scrape configuration). PostgreSQL 15 is Debian's
# postgresql-15, installed with it too when missing. Nothing is started: scripts/stack.py runs them itself.
stack-deps:
	@missing=""; command -v haproxy >/dev/null || missing="$$missing haproxy"; \
	test -x /usr/lib/postgresql/15/bin/pg_ctl || missing="$$missing postgresql-15"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "make stack-deps: missing$$missing; as root: apt-get install -y$$missing"; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; } || \
		echo "make stack-deps: Prometheus not installed; the stack writes its scrape configuration only"

# PostgreSQL, mlflow server, two gateway replicas behind HAProxy, Prometheus, in .stack/ (kept by stack-down).
stack: install stack-deps
	$(PY) scripts/stack.py up

stack-down:
	$(PY) scripts/stack.py down

stack-status:
	$(PY) scripts/stack.py status

# Headless Chromium for the UI test: Debian's package (root, as on these machines and CI).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# requirements*.in -> requirements.txt, requirements-dev.txt (hash-locked, by uv),
# conda.yaml, mlflow_dspy/requirements.txt; existing pins stay unless UPGRADE="name ..." names them.
lock: install
	$(PY) scripts/lock.py $(foreach name,$(UPGRADE),--upgrade-package $(name))

# The lock against known vulnerabilities (pip-audit, PyPI's advisory data by
# default; AUDIT_ARGS="-s osv --osv-url URL" for an OSV mirror). --strict: a
# package the service cannot answer for fails the audit rather than passing unseen.
audit: install
	$(BIN)/pip-audit --strict --disable-pip --require-hashes --progress-spinner off -r requirements-dev.txt \
		$(AUDIT_ARGS) || { echo "make audit failed: a known vulnerability, or a service that did not answer (README, Install)"; exit 1; }

# The distribution: dist/mlflow_dspy-<version>-py3-none-any.whl and the sdist.
# The wheel is built from the sdist (in a temporary directory), so a broken
# sdist fails here; a stale egg-info could carry deleted files into the sdist.
# build/ is left alone: `docker` writes there. See README, Install. The
# egg-info the sdist leaves goes too: in the checkout it would hide the
# installed entry points (the trace store plugin) from a Python started here.
dist: install
	rm -rf dist mlflow_dspy.egg-info
	$(PY) -m build --outdir dist .
	rm -rf mlflow_dspy.egg-info

log: install
	$(PY) mlflow_dspy.py log $(PROGRAM) --json | tee .log.out
	tail -n 1 .log.out > .last_run.json && rm -f .log.out

MODEL_URI ?= runs:/$(RUN_ID)/model

# serve, gateway and docker need a model: the last logged run, RUN_ID=, or MODEL_URI=models:/...
model-uri:
	@test -n "$(RUN_ID)$(filter models:/%,$(MODEL_URI))" || { echo "no logged run: 'make log' first, or RUN_ID=<run id>, or MODEL_URI=models:/..."; exit 1; }

serve: install model-uri
	$(PY) mlflow_dspy.py serve -m $(MODEL_URI) -p $(PORT) --env-manager local

gateway: install model-uri
	$(PY) mlflow_dspy.py gateway -m $(MODEL_URI) --port $(GATEWAY_PORT) --workers $(WORKERS)

docker: install model-uri
	$(PY) mlflow_dspy.py docker -m $(MODEL_URI)

ui: install
	mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --default-artifact-root ./mlartifacts \
		--host 127.0.0.1 --port $(UI_PORT)

curl:
	curl -s http://127.0.0.1:$(PORT)/invocations -H "Content-Type:application/json" \
		--data '{"messages": [{"content": "what is 2 + 2?", "role": "user"}]}'
	@echo

demo: log
	PORT=$(PORT) RUN_ID=$$($(PYTHON) -c "import json;print(json.load(open('.last_run.json'))['run_id'])") \
		bash scripts/demo.sh

# The loop on the embedded model: serve the champion, rate its answers, improve, see who answers now.
flywheel: install
	$(PY) scripts/flywheel.py

# The suite on TEST_WORKERS pytest-xdist workers (README, Tests): most of a test's time is spent waiting
# on the processes it starts, so more workers than cores pays.
TEST_WORKERS ?= 4
test: install browser stack-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The unit tests only: no process, no embedded model (README, Tests).
test-fast: install
	$(PY) -m pytest -m unit

bench: install stack-deps
	$(PY) -m bench.run

# Ten minutes of mixed load (good, bad, LM faults) on one gateway: bench/results/soak.json
soak: install
	$(PY) -m bench.soak --minutes 10

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .last_run.json .serve.log build dist *.egg-info
