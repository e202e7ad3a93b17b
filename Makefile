# LoRA Lab: two commands.
#   make book   set up, then build the book from the notebooks' committed outputs
#               (make book EXECUTE=1 executes the notebooks first, cached)
#   make test   set up, then run every check of the course
#
# Set-up uses the active virtual environment if there is one; otherwise it
# makes .venv here. If torch is not installed there yet and the machine has no
# NVIDIA GPU, it installs the small CPU build of torch first, from
# $(TORCH_CPU_INDEX), rather than let pip fetch the large CUDA build; a torch
# already installed (from a local wheel, an offline index...) is kept.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lora-lab-installed
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_FALLBACK := torch comes with requirements.txt from your usual index instead, which on a \
CPU-only machine may be the large CUDA build. To choose the build, install torch into $(VENV) \
first (see README) and run make again.
# make book EXECUTE=1: execute the notebooks (cached) instead of showing their committed outputs
EXECUTE ?= 0

# never let transformers or the hub reach the network
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# keep numbers identical across runs of the same machine
export PYTHONHASHSEED := 0
# idle OpenMP threads sleep instead of spinning, in every process the tests start (lora_lab
# sets the same when it is imported first; see benchmarks/busy_machine.py)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup book test unit alltests notebooks lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "set-up: keeping the torch already installed ($$($(PY) -c 'import torch; print(torch.__version__)'))"; \
	elif nvidia-smi >/dev/null 2>&1 || test -e /proc/driver/nvidia; then \
	    echo "set-up: NVIDIA GPU found: torch comes with requirements.txt"; \
	elif $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=20)" 2>/dev/null; then \
	    echo "set-up: no NVIDIA GPU: installing the CPU build of torch from $(TORCH_CPU_INDEX)"; \
	    $(PY) -m pip install --quiet torch --index-url $(TORCH_CPU_INDEX) \
	        || echo "set-up: installing torch from $(TORCH_CPU_INDEX) failed; $(TORCH_FALLBACK)" >&2; \
	else \
	    echo "set-up: no NVIDIA GPU, but $(TORCH_CPU_INDEX) cannot be reached; $(TORCH_FALLBACK)" >&2; \
	fi
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

# one command builds the book, here and in the browser test (tests/book.py)
book: setup
	$(PY) scripts/chapter_cells.py --check
	$(PY) -m tests.book build $(if $(filter 1,$(EXECUTE)),--execute)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the quick loop: every test but the slow ones (chapters on other models, subprocess crashes,
# the GPU script's CPU path) and the browser
unit: setup
	$(PY) -m pytest tests -m "not slow and not browser" --durations=10

# everything CI runs
alltests: setup
	$(PY) -m pytest tests --durations=15

notebooks: setup
	$(PY) -m pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--nbval-cell-timeout=120 -p no:cacheprovider notebooks

test: lint alltests notebooks

clean:
	rm -rf _build _vendor/mathjax
