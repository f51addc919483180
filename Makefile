# Two commands on a fresh machine: `make run` (the whole pipeline, offline) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# `mlflow run --env-manager local` runs `python steps/...`: put the venv first on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
EXPERIMENT ?= slm-chat
MODEL ?= smollm2-135m
# A chat template for a checkpoint without one (a Jinja file, or a preset whose template to use):
# `make run MODEL=gemma-3-270m-q4_k_m.gguf CHAT_TEMPLATE=gemma3-270m`.
CHAT_TEMPLATE ?=

.PHONY: run test test-fast lint bench serve clean java-check

# Spark (batch_infer, and its tests) runs on the machine's Java 17 or later.
JAVA_HINT := Java 17+ is missing: install it (Debian/Ubuntu: sudo apt-get install openjdk-17-jre-headless) or set JAVA_HOME; batch_infer -P engine=spark needs it
java-check:
	@command -v java >/dev/null 2>&1 || test -x "$$JAVA_HOME/bin/java" || { echo "$(JAVA_HINT)"; exit 1; }

$(STAMP): conda.yaml requirements-dev.txt slmkit/environment.py
	@command -v java >/dev/null 2>&1 || test -x "$$JAVA_HOME/bin/java" || echo "note: $(JAVA_HINT)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pyyaml==6.0.3
	$(BIN)/python -m slmkit.environment conda.yaml > $(VENV)/requirements.txt
	$(BIN)/python -m pip install --quiet -r $(VENV)/requirements.txt -r requirements-dev.txt
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mlflow run . --env-manager local --experiment-name $(EXPERIMENT) -P model=$(MODEL) -P chat_template=$(CHAT_TEMPLATE)

# One pytest worker per core; tests/conftest.py keeps the tests that share a store on one worker.
TEST_WORKERS ?= auto
test: $(STAMP) java-check
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

# The tests that start no process (no server, Spark, `mlflow run` or builder): well under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Either registered model behind MLflow's scoring app plus an OpenAI route (slmkit/serving/app.py).
MODEL_URI ?= models:/slm-chat-onnx@champion
PORT ?= 5001
serve: $(STAMP)
	$(BIN)/python -m slmkit.serve -m $(MODEL_URI) -p $(PORT)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db
