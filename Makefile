# The README's commands. `make demo` and `make test` work on a fresh clone with nothing else done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
XRAYCLS := $(VENV)/bin/xraycls
STAMP := $(VENV)/.installed
DATA_DIR ?= data
DEMO_DIR := $(DATA_DIR)/demo

# The legacy (IPU-era) stack, beside the main one: torch 2.0.1, Lightning 2.0.9, lightning-graphcore 0.1.0.
LEGACY_VENV := .venv-legacy
LEGACY_PY := $(LEGACY_VENV)/bin/python
LEGACY_STAMP := $(LEGACY_VENV)/.installed
LEGACY_REQUIREMENTS := requirements/legacy.txt
# What the IPU path needs to run there: the plan, the IPU path, the model, the metrics, the data pipeline.
LEGACY_TESTS := tests/test_legacy_stack.py tests/test_checkpoint_safety.py tests/test_ipu.py tests/test_plan.py tests/test_module.py \
	tests/test_backbone.py tests/test_schedule.py tests/test_metrics.py tests/test_datamodule.py \
	tests/test_transforms.py

.PHONY: demo test test-fast test-legacy lint install install-legacy clean-demo benchmarks notebook

# Reinstall only when the dependency list changes; the editable install picks up code changes by itself.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# requirements/legacy.txt pins the stack; xraycls goes in without its dependencies, as pyproject pins the
# main stack's torch.
$(LEGACY_STAMP): $(LEGACY_REQUIREMENTS)
	@test -x $(LEGACY_PY) || $(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_PY) -m pip install --quiet --upgrade pip
	$(LEGACY_PY) -m pip install --quiet -r $(LEGACY_REQUIREMENTS)
	$(LEGACY_PY) -m pip install --quiet --no-deps -e .
	@touch $(LEGACY_STAMP)

install-legacy: $(LEGACY_STAMP)

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

# The IPU path's CPU tests on the legacy stack, after checking that Lightning's IPU classes import there.
test-legacy: $(LEGACY_STAMP)
	$(LEGACY_PY) -c 'import lightning, lightning_graphcore, torch; from lightning.pytorch.strategies import IPUStrategy; \
		print("legacy stack: torch", torch.__version__, "lightning", lightning.__version__, \
		"lightning-graphcore", lightning_graphcore.__version__, "IPUStrategy", IPUStrategy.__module__)'
	$(LEGACY_PY) -m pytest -q $(LEGACY_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

benchmarks: $(STAMP)
	$(PY) experiments/benchmarks/prepare_throughput.py
	$(PY) experiments/benchmarks/loader_throughput.py
	$(PY) experiments/benchmarks/train_throughput.py --ablations

# The walkthrough notebook in Jupyter, served on this machine only (127.0.0.1). Notebook 7 asks for a token
# by default (printed in the URL it shows): keep it, a token-less server runs code for anyone who reaches it.
notebook: $(STAMP)
	$(VENV)/bin/jupyter notebook experiments/walkthrough.ipynb --ip=127.0.0.1 --no-browser

clean-demo:
	rm -rf $(DEMO_DIR)
