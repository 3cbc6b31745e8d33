# make demo: install into .venv and run the main job on the bundled default.
# make test: install into .venv (with the test references) and run the CPU test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on this kind of machine 2.13.0 is a local CPU wheel; an
	# unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch

.PHONY: install install-test demo test gpu-test
install: $(BIN)/activate
	$(BIN)/pip install -q -e .

install-test: $(BIN)/activate
	$(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/ossrl demo

test: install-test
	$(BIN)/python -m pytest -q -m "not gpu"

gpu-test:
	python -m pytest -q -m gpu
