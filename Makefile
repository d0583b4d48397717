# One command each: `make train` (install + main job) and `make test` (install + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned so pip takes the same build everywhere (CPU wheel here, CUDA build on GPU machines).
TORCH ?= torch==2.13.0

.PHONY: install train test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,sweep,transformers,peers,dashboard,export,dicom]"
	touch $@

train: install
	$(PY) -m medseg.train +precision=mixed $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

lint: install
	$(PY) -m ruff check medseg tests benchmarks notebooks
	$(PY) -m ruff format --check medseg tests benchmarks notebooks
