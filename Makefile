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
# without pip's cache, into a wheelhouse of its own.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF
WHEELHOUSE ?= $(HOME)/.cache/mlflow-dspy/wheelhouse
export WHEELHOUSE
LLAMA_STAMP := $(WHEELHOUSE)/.llama-cpp-python-$(LLAMA_VERSION)-nonative

RUN_ID ?= $(shell $(PYTHON) -c "import json;print(json.load(open('.last_run.json'))['run_id'])" 2>/dev/null)

.PHONY: install wheels browser lock dist log model-uri serve gateway docker ui curl demo flywheel test test-fast lint bench soak clean

install: $(VENV)/.installed

# The pinned lock first, then this checkout itself, editable and without
# dependencies (they are all in the lock): `import mlflow_dspy` is this
# checkout's code, and .venv/bin/mlflow-dspy exists beside `python mlflow_dspy.py`.
$(VENV)/.installed: mlflow_dspy/requirements.txt requirements-dev.txt requirements.in pyproject.toml $(LLAMA_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_FIND_LINKS="$(WHEELHOUSE) $${PIP_FIND_LINKS:-}" $(PY) -m pip install -r requirements-dev.txt
	PIP_FIND_LINKS="$(WHEELHOUSE) $${PIP_FIND_LINKS:-}" $(PY) -m pip install --no-deps -e .
	touch $@

wheels: $(LLAMA_STAMP)

$(LLAMA_STAMP):
	mkdir -p $(WHEELHOUSE)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel --no-deps --no-cache-dir \
		-w $(WHEELHOUSE) llama-cpp-python==$(LLAMA_VERSION)
	touch $@

# Headless Chromium for the UI test: Debian's package (root, as on these machines and CI).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lock: $(LLAMA_STAMP)
	PIP_FIND_LINKS="$(WHEELHOUSE) $${PIP_FIND_LINKS:-}" $(PY) scripts/lock.py

# The distribution: dist/mlflow_dspy-<version>-py3-none-any.whl and the sdist.
# The wheel is built from the sdist (in a temporary directory), so a broken
# sdist fails here; a stale egg-info could carry deleted files into the sdist.
# build/ is left alone: `docker` writes there. See README, Install.
dist: install
	rm -rf dist mlflow_dspy.egg-info
	$(PY) -m build --outdir dist .

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

test: install browser
	$(PY) -m pytest

# The unit tests only: no process, no embedded model (README, Tests).
test-fast: install
	$(PY) -m pytest -m unit

bench: install
	$(PY) -m bench.run

# Ten minutes of mixed load (good, bad, LM faults) on one gateway: bench/results/soak.json
soak: install
	$(PY) -m bench.soak --minutes 10

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .last_run.json .serve.log build dist *.egg-info
