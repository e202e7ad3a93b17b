# LoRA Lab: two commands.
#   make book   set up, execute the notebooks (cached) and build the book
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

# never let transformers or the hub reach the network
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
# keep numbers identical across runs of the same machine
export PYTHONHASHSEED := 0

.PHONY: setup book test unit notebooks lint clean

setup: $(STAMP) _vendor/mathjax/tex-chtml.js

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

_vendor/mathjax/tex-chtml.js: $(STAMP)
	$(PY) scripts/vendor_mathjax.py

book: setup
	$(PY) scripts/chapter_cells.py --check
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is built: open file://$(CURDIR)/_build/html/index.html"

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
