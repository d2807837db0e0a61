# Everything a user runs. `make setup` is idempotent; every other target depends on it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= out
DATASET ?= ml-100k
PORT ?= 8080
IMAGE ?= twostage-rec:latest
STAMP := $(VENV)/.installed

.PHONY: setup train serve feature-store demo test test-unit bench bench-quick bench-scale audit soak image clean notebooks notebooks-clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/serve.txt requirements/train.txt requirements/dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev,launch]'
	@touch $(STAMP)

train: setup  ## train on $(DATASET) (default ml-100k) into $(OUT)/
	$(PY) -m training run --dataset $(DATASET) --out $(OUT)

serve: setup  ## serve $(OUT)/model on the host on $(PORT) with multi-model-server
	@test -f $(OUT)/model/model_manifest.json || { echo "no model in $(OUT)/model: run 'make train' first"; exit 1; }
	SAGEMAKER_BASE_DIR=$(abspath $(OUT)) SAGEMAKER_BIND_TO_PORT=$(PORT) $(VENV)/bin/serve

feature-store: setup  ## the local Feature Store server on 127.0.0.1:8090
	$(PY) -m local_test.feature_store serve --port 8090 --db $(OUT)/feature-store.db

demo: setup  ## train on ML-100k, serve (Docker if an engine answers), print recommendations
	$(PY) -m local_test.demo --out $(OUT)

image:  ## build the serving image
	DOCKER_BUILDKIT=1 /usr/bin/docker build -t $(IMAGE) .

test: setup  ## the whole suite (container tests skip with a reason when no Docker engine answers)
	$(PY) -m pytest -q

test-unit: setup
	$(PY) -m pytest -q tests/unit

audit: setup  ## pickle scan, pip-audit of requirements/serve.txt (skips with the reason when no database answers)
	$(PY) -m reliability.audit

soak: setup  ## 10 minutes at concurrency 8 against the container (or the host server without Docker)
	$(PY) -m reliability.soak --minutes 10 --concurrency 8

bench: setup
	$(PY) -m bench --out bench-results/BENCHMARKS.md

bench-quick: setup
	$(PY) -m bench --quick --out bench-results/BENCHMARKS-quick.md

bench-scale: setup  ## catalog size x user count up to 10M users: disk, cold start, PSS per worker (bench-results/)
	$(PY) -m bench --only serving-scale

notebooks: setup  ## run notebooks/0*.ipynb in order (target from the environment); executed copies in $(OUT)/notebooks/executed
	$(PY) notebooks/nbtool.py run --out $(OUT)/notebooks/executed

notebooks-clean:  ## strip outputs and execution counts from notebooks/*.ipynb (the tests refuse them)
	$(PYTHON) notebooks/nbtool.py strip

clean:
	rm -rf $(OUT) .pytest_cache
