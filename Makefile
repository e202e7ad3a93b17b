# LoRA Lab: two commands.
#   make book   set up, then build the book from the notebooks' committed outputs
#               (make book EXECUTE=1 executes the notebooks first, cached)
#   make test   set up, then run every check of the course
#
# Set-up uses the active virtual environment if there is one; otherwise it
# makes .venv here. On a CPU-only machine install the small CPU build of torch
# first (see README), or pip will fetch the large CUDA build.

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
# make book EXECUTE=1: execute the notebooks (cached) instead of showing their committed outputs
EXECUTE ?= 0

# never let transformers or the hub reach the network
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# keep numbers identical across runs of the same machine
export PYTHONHASHSEED := 0

.PHONY: setup book test unit notebooks lint clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

# one command builds the book, here and in the browser test (tests/book.py)
book: setup
	$(PY) scripts/chapter_cells.py --check
	$(PY) -m tests.book build $(if $(filter 1,$(EXECUTE)),--execute)

lint: setup
	$(PY) -m ruff check .

unit: setup
	$(PY) -m pytest tests

notebooks: setup
	$(PY) -m pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg \
		--nbval-cell-timeout=300 -p no:cacheprovider notebooks

test: lint unit notebooks

clean:
	rm -rf _build _vendor/mathjax
