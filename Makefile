# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; install it first so that no
# dependency range can pull a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: demo test lint install screenshots

$(BIN)/qfedit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/qfedit

demo: install
	$(BIN)/qfedit demo

test: install
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check qfedit worker api cli tests bench tools migrations
	$(BIN)/ruff format --check qfedit worker api cli tests bench tools migrations
	$(BIN)/mypy
	$(BIN)/mypy tools

# The console's screenshots in docs/console (the demo's data, the system's Chromium).
screenshots: install
	$(BIN)/python tools/console_screenshots.py
