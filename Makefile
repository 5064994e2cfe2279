# make demo   create the environment and run the whole pipeline on the embedded demo (CPU, offline)
# make test   create the environment and run the test suite
# make report the demo run's report (curves, base vs fine-tuned, answers, resources, timings): results/demo/report.html
# make lint   snakemake --lint, snakefmt --check, ruff
# make bench  our train stage vs a plain TRL+PEFT baseline (8B architecture on a GPU, the tiny model on the CPU);
#             BENCH_ARGS="--preset mistral-7b" picks another; scripts/tools/bench.py merge|workflow for the others

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# transformers 4 apart from the environment: tests/test_portable.py loads merged models with it.
export TRANSFORMERS4_PATH := $(abspath $(VENV))/transformers4
# Stage jobs run `python`: the environment's, found on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo report test lint bench clean

PACKAGE := $(VENV)/.package

env: $(STAMP) $(PACKAGE)

# The library (scripts/hpc_finetune), installed editable as links to its files: an edit is seen at once, a new or
# removed module (a directory's time changes) re-links. Strict mode: only the package, not the stage programs
# next to it, becomes importable in the environment.
$(PACKAGE): $(STAMP) pyproject.toml $(shell find scripts/hpc_finetune -type d -not -name __pycache__)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --editable . \
		--config-settings editable_mode=strict
	touch $@

# torch==2.13.0 is pinned: pip takes the CPU wheel where one is on disk, the CUDA build elsewhere.
$(STAMP): singularity/requirements.txt requirements-dev.txt requirements-transformers4.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-r singularity/requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
		--target $(TRANSFORMERS4_PATH) -r requirements-transformers4.txt
	touch $@

demo: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --profile profiles/local

report: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --profile profiles/local --report results/demo/report.html

test: $(STAMP) $(PACKAGE)
	$(BIN)/python -m pytest

BENCH_ARGS ?=
bench: $(STAMP) $(PACKAGE)
	$(BIN)/python scripts/tools/bench.py train $(BENCH_ARGS)

lint: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/ruff check scripts workflow tests

clean:
	rm -rf results resources .snakemake build
