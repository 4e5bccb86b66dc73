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
	$(PIP) install -e ".[test,eval]"

# the bundled model (a small DeepSeek-V2 trained on the built-in corpus) continues a prompt
run: install
	$(PYTHON) -m dsv2 generate "HAMLET. To be, or not to be," --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 0

test: install-test
	$(PYTHON) -m pytest

test-gpu:
	$(PYTHON) -m pytest -m gpu -rs
