# Set-up is part of every target: a fresh machine needs only python3 (3.10+).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdstore-installed

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml setup.py kdstore/_native.c Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch, pinned: an unpinned torch pulls gigabytes of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[data,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/store_bench.py
	$(BIN)/python bench/capture_bench.py
	$(BIN)/python bench/align_bench.py
	$(BIN)/python bench/train_bench.py
	$(BIN)/python bench/rdrop_bench.py
	$(BIN)/python bench/cascade_bench.py

clean-venv:
	rm -rf $(VENV)
