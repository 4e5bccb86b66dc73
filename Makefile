# Fresh machine: `make run` (install + the main job), `make test` (install + the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: install install-test run test test-gpu

# torch first, pinned to the local CPU wheel where no torch is installed yet, so that the
# package's bare `torch>=2.4` never pulls a multi-GB CUDA build; a GPU machine keeps its own.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e .

install-test: install
	$(PIP) install -e ".[test]"

run: install
	$(PYTHON) -m dsv2 info --preset deepseek-v2

test: install-test
	$(PYTHON) -m pytest

test-gpu:
	$(PYTHON) -m pytest -m gpu -rs
