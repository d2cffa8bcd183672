# The README's commands. `make demo` and `make test` work on a fresh clone with nothing else done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
XRAYCLS := $(VENV)/bin/xraycls
STAMP := $(VENV)/.installed
DATA_DIR ?= data
DEMO_DIR := $(DATA_DIR)/demo

.PHONY: demo test test-fast lint install clean-demo benchmarks

# Reinstall only when the dependency list changes; the editable install picks up code changes by itself.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Synthetic NIH-format data -> uint8 cache -> data summary -> train, test, export and plot the tiny ViT.
demo: $(STAMP)
	$(XRAYCLS) synth --out $(DEMO_DIR)/raw --n 600 --size 128 --seed 0 --min-prevalence 0.08
	$(XRAYCLS) prepare --root $(DEMO_DIR)/raw --cache $(DEMO_DIR)/cache --size 64
	$(XRAYCLS) inspect --cache $(DEMO_DIR)/cache --size 64 --input-size 64 --split official --batch-size 32
	$(PY) train.py experiment=demo paths.data_dir=$(DATA_DIR)

test: $(STAMP)
	$(PY) -m pytest -q

# The suite without the tests marked slow (DDP, resume after a kill, multirun): a quicker local loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmarks: $(STAMP)
	$(PY) experiments/benchmarks/prepare_throughput.py
	$(PY) experiments/benchmarks/loader_throughput.py
	$(PY) experiments/benchmarks/train_throughput.py --ablations

clean-demo:
	rm -rf $(DEMO_DIR)
