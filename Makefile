# Two entry points: `make run` (the whole embedded benchmark through Snakemake: prepare → tokenizer → shard →
# pretrain → finetune → evaluate → report) and `make test`. Both create .venv from the pinned lock file when it
# is missing. `make repro` runs the same stage graph through DVC; `make smoke` the CI-sized profile; `make test-fast`
# the tests not marked slow.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: venv run repro smoke test test-fast test-torch2.11 clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	snakemake --profile workflow/profiles/local

repro: $(STAMP)
	dvc repro

smoke: $(STAMP)
	snakemake --profile workflow/profiles/local --config profile=smoke

# Every test: the quick suite and the ones marked slow (pyproject's addopts leave those out of a bare `pytest`).
test: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

test-fast: $(STAMP)
	$(PY) -m pytest -q

# The GPU machines' stack (torch 2.11.0, torchvision 0.26, torchaudio 2.11) in a venv of its own, from PyPI (some
# 3 GB with its CUDA libraries), running the same suite: the library must work on both.
COMPAT := .venv-torch2.11
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0

$(COMPAT)/.installed: pyproject.toml requirements.lock
	test -x $(COMPAT)/bin/python || $(PYTHON) -m venv $(COMPAT)
	grep -v -E '^(torch|torchvision|torchaudio|triton|nvidia-|cuda-)' requirements.lock > $(COMPAT)/requirements.txt
	$(COMPAT)/bin/python -m pip install -q -r $(COMPAT)/requirements.txt
	$(COMPAT)/bin/python -m pip install -q $(COMPAT_PINS)
	$(COMPAT)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-torch2.11: $(COMPAT)/.installed
	PATH=$(abspath $(COMPAT))/bin:$$PATH $(COMPAT)/bin/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf runs logs benchmarks .snakemake .pytest_cache
