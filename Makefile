# make demo   create the environment and run the whole pipeline on the embedded demo (CPU, offline)
# make test   create the environment and run the test suite
# make lint   snakemake --lint, snakefmt --check, ruff

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stage jobs run `python`: the environment's, found on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test lint clean

env: $(STAMP)

# torch==2.13.0 is pinned: pip takes the CPU wheel where one is on disk, the CUDA build elsewhere.
$(STAMP): singularity/requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r singularity/requirements.txt -r requirements-dev.txt
	touch $@

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/local

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/ruff check scripts workflow tests

clean:
	rm -rf results resources .snakemake
