# Two entry points: `make bench` runs the benchmark, `make test` runs the test suite.
# Each creates the virtual environment $(VENV) when it is missing and installs the package into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.inhibmoe_fast-installed
ARGS ?=

.PHONY: bench test install clean

install: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A current pip builds the editable install through PEP 660; the pip that venv ships
	# (23.x) falls back to `setup.py develop`, which rebuilds in an isolated environment
	# that has no torch.
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install torch
	$(PY) -m pip install --no-build-isolation -e '.[bench,dev]'
	touch $@

bench: $(STAMP)
	$(PY) -m inhibmoe_fast.bench $(ARGS)

# The pytest script, unlike `python -m pytest`, keeps the checkout root off sys.path, so the
# kernels/ folder cannot shadow the unrelated top-level package named kernels that
# transformers imports when it is installed.
test: $(STAMP)
	$(VENV)/bin/pytest -q tests

clean:
	rm -rf build *.egg-info $(STAMP)
