# Two entry points: `make demo` and `make test`. Both build .venv from the project's own files.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Tested versions; torch==2.13.0 keeps pip on the CPU build instead of pulling CUDA wheels.
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast stress-test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 \
		| sed '/is ignored: it is neither a file nor a directory/d'
	$(PY) -c "from evamim._compat import install_torchvision_hook; install_torchvision_hook()"
	$(PY) -c "import timm, open_clip, transformers, webdataset, evamim" # fail here, loudly, if the install broke
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/evamim demo

# The whole suite, slow tests included, on 2 processes.
test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15

# Fast feedback while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow"

# The whole suite RUNS times in a row, stopping at the first failure (multi-process flakiness shows only so).
RUNS ?= 30
stress-test: $(STAMP)
	$(PY) tools/stress_test.py --runs $(RUNS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
