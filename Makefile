# Two entry points: `make run` (the whole embedded benchmark through Snakemake: prepare → tokenizer → shard →
# pretrain → finetune → evaluate → report) and `make test`. Both create .venv from the pinned lock file when it
# is missing. `make repro` runs the same stage graph through DVC; `make smoke` the CI-sized profile.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

BIN    := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: venv run repro smoke test clean

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

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs logs benchmarks .snakemake .pytest_cache
