# Each target sets up its own virtual environment (.venv) first; nothing is needed beyond Python 3.10+ and pip.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13 (on these machines it comes from local disk); override for a CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The oldest supported transformers (setup.cfg), installed beside the venv to test that Hub folders load with it.
COMPAT := $(VENV)/compat-transformers
COMPAT_VERSION := $(shell sed -n 's/.*transformers>=\([0-9.]*\).*/\1/p' setup.cfg)

.PHONY: setup run test bench clean

$(BIN)/hf-attnres: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

$(COMPAT)/.done: $(BIN)/hf-attnres
	rm -rf $(COMPAT) && $(BIN)/python -m pip install -q --target $(COMPAT) "transformers==$(COMPAT_VERSION)"
	touch $@

setup: $(BIN)/hf-attnres

run: setup  ## the main job on the embedded default
	$(BIN)/hf-attnres run

test: setup $(COMPAT)/.done  ## the test suite
	HF_ATTNRES_COMPAT_TRANSFORMERS=$(abspath $(COMPAT)) $(BIN)/python -m pytest -q tests

bench: setup  ## speed/memory ratios against LlamaForCausalLM (~15 min, needs a quiet machine)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs
