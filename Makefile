# vlm2rec-ray developer entry points. `make test` and `make demo` work from a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
export VLM2REC_BUILD_DIR ?= $(CURDIR)/build

.PHONY: install test test-unit test-integration lint demo doctor bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch is pinned as requirement AND constraint: unpinned, pip pulls a multi-GB CUDA build.
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q tests

test-unit: install
	$(PY) -m pytest -q tests/unit

test-integration: install
	$(PY) -m pytest -q -m integration tests

lint: install
	$(VENV)/bin/ruff check .

# make demo VERBOSE=1: full Ray / worker output (every metric dict, Ray Train's reports, library warnings)
demo: install
	$(VENV)/bin/vlm2rec demo $(if $(VERBOSE),--verbose)

doctor: install
	$(VENV)/bin/vlm2rec doctor

bench: install
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/embed_pipeline.py
	$(PY) benchmarks/embed_pipeline.py --warm-up 64

clean:
	rm -rf build .pytest_cache .ruff_cache
