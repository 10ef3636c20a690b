# Each target sets up its own virtual environment (.venv) first; nothing is needed beyond Python 3.10+ and pip.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch 2.13 (on these machines it comes from local disk); override for a CUDA build.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The oldest transformers setup.cfg admits, in an environment of its own: users run whatever release they have,
# and releases rename what a model receives (5.24: `past_key_values` -> `cache`).
OLDEST_VERSION := $(shell sed -n 's/.*transformers>=\([0-9.]*\).*/\1/p' setup.cfg)
OLDEST := $(VENV)-oldest
# The test files whose outcome depends on the transformers release: cache, generate, pipeline, Hub load, conversion.
RELEASE_TESTS := tests/test_generation.py tests/test_hub.py tests/test_identity.py tests/test_conversion.py

.PHONY: setup run test test-releases bench clean

# $(call venv,DIR,REQUIREMENTS): a fresh virtual environment with torch, this package and REQUIREMENTS
venv = rm -rf $(1) && $(PYTHON) -m venv $(1) && $(1)/bin/python -m pip install -q --upgrade pip \
	&& $(1)/bin/python -m pip install -q "$(TORCH)" && $(1)/bin/python -m pip install -q -e ".[dev]" $(2)

$(BIN)/hf-attnres: setup.cfg pyproject.toml
	$(call venv,$(VENV))
	touch $@

$(OLDEST)/.done: setup.cfg pyproject.toml
	$(call venv,$(OLDEST),"transformers==$(OLDEST_VERSION)")
	touch $@

$(VENV)-releases/.done: setup.cfg pyproject.toml
	$(call venv,$(VENV)-releases)
	touch $@

setup: $(BIN)/hf-attnres

run: setup  ## the main job on the embedded default
	$(BIN)/hf-attnres run

SAY_RELEASE = -c "import transformers; print('== tests on transformers', transformers.__version__)"

test: setup $(OLDEST)/.done  ## the whole suite on the newest transformers, the release-sensitive files on the oldest
	@$(BIN)/python $(SAY_RELEASE)
	HF_ATTNRES_OLDEST_PYTHON=$(abspath $(OLDEST))/bin/python $(BIN)/python -m pytest -q tests
	@$(OLDEST)/bin/python $(SAY_RELEASE)
	$(OLDEST)/bin/python -m pytest -q $(RELEASE_TESTS)

test-releases: $(VENV)-releases/.done  ## the release-sensitive files on every transformers minor release we support
	$(VENV)-releases/bin/python tests/release_matrix.py $(RELEASE_TESTS)

bench: setup  ## speed/memory ratios against LlamaForCausalLM (~15 min, needs a quiet machine)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(OLDEST) $(VENV)-releases runs
