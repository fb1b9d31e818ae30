# make run   — set up .venv and run the main job: validate every backend available here against
#              the float64 oracle (on a GPU also tune and benchmark)
# make test  — set up .venv and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# a second interpreter with the GPU image's Triton: the AOT builds of the defaults as the GPU's
# Triton makes them (tests/test_triton36_builds.py; CI's own Triton is newer)
VENV36 ?= .venv-triton36
TRITON36 ?= triton==3.6.0
# caches and scratch stay inside the workspace
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export TRITON_HOME ?= $(CURDIR)/.cache/triton-home
export TILELANG_CACHE_DIR ?= $(CURDIR)/.cache/tilelang
export TMPDIR := $(CURDIR)/.cache/tmp
export CUDA_HOME ?= /usr/local/cuda
export TRITON_DEFAULT_FP_FUSION ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: run test setup clean

$(VENV)/.installed: setup.py
	@mkdir -p $(TMPDIR)
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[all,dev]'
	@touch $@

$(VENV36)/.installed:
	@mkdir -p $(TMPDIR)
	$(PY) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q --upgrade pip
	$(VENV36)/bin/python -m pip install -q "$(TORCH)" "$(TRITON36)" numpy pytest
	@touch $@

setup: $(VENV)/.installed $(VENV36)/.installed

run: $(VENV)/.installed
	@mkdir -p $(TMPDIR) bench/results
	$(BIN)/mamba3-kernels validate --json .cache/validate.json
	@if $(BIN)/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  $(BIN)/mamba3-kernels tune --op step --B 1,64,256 --R 1 --H 32 --N 128 --P 64 --A 32 --has-d --has-z || exit 1; \
	  $(BIN)/mamba3-kernels tune --op step --B 1,64,256 --R 4 --H 32 --N 128 --P 64 --A 32 --has-d --has-z \
	    --mimo-v --mimo-z --mimo-out --pairing half || exit 1; \
	  $(BIN)/mamba3-kernels tune --op forward --B 4 --L 4096 --H 32 --N 128 --P 64 --A 32 --has-d --has-z \
	    --shared-angles || exit 1; \
	  $(BIN)/mamba3-kernels bench --op step --H 32 --out bench/results/bench_step_local.json; \
	else echo "no GPU here: tuning and benchmarks skipped (they run on the GPU)"; fi

# On a GPU host the CPU tests (Triton interpreter on CPU tensors) run in a process that cannot see
# the GPU (tests/conftest.py sets TRITON_INTERPRET there), then the GPU tests in another.
test: $(VENV)/.installed $(VENV36)/.installed
	@mkdir -p $(TMPDIR)
	@if $(BIN)/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  echo "GPU here: CPU tests first (interpreter, GPU hidden), then the GPU tests (-m gpu)"; \
	  CUDA_VISIBLE_DEVICES= MAMBA3_TRITON36_PYTHON=$(CURDIR)/$(VENV36)/bin/python $(BIN)/python -m pytest -q -m "not gpu" tests \
	    && $(BIN)/python -m pytest -q -m gpu tests; \
	else MAMBA3_TRITON36_PYTHON=$(CURDIR)/$(VENV36)/bin/python $(BIN)/python -m pytest -q tests; fi

clean:
	rm -rf .cache .pytest_cache .hypothesis
