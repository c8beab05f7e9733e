# The two commands a new user types: `make run-guest` and `make test`.
# Each sets itself up on first use (.venv, packages, guest builds).
# `make docs` builds the documentation site and checks its links; `make lint` runs ruff (lint and
# format check) and mypy (the public API's annotations).
# PY=/path/to/python runs everything with that Python as it is (no .venv is made or changed).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GUEST  ?= hello
RUNARGS ?= --trace
# What sets the project up: the .venv stamp, or nothing when PY names another Python.
SETUP  := $(if $(filter $(VENV)/bin/python,$(PY)),$(STAMP))

.PHONY: run-guest test guests native bench docs lint clean check-binutils check-cc venv

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "error: Python >= 3.10 is needed (found: $$($(PYTHON) --version 2>&1))"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || \
	  { echo "error: the Python venv module is missing: install it (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	@touch $(STAMP)

venv: $(STAMP)

check-binutils:
	@command -v as >/dev/null 2>&1 && command -v ld >/dev/null 2>&1 || \
	  { echo "error: GNU as/ld not found; guests are assembled with binutils."; \
	    echo "       install it: apt-get install binutils   (Fedora: dnf install binutils)"; exit 1; }

# C guests (guest/*.c) are compiled with $(CC) when set, else gcc, else clang.
check-cc:
	@if [ -n "$${CC}" ]; then command -v $${CC%% *} >/dev/null 2>&1; else \
	  command -v gcc >/dev/null 2>&1 || command -v clang >/dev/null 2>&1; fi || \
	  { echo "error: no C compiler found (gcc or clang): C guests are compiled with one; install it: apt-get install gcc"; exit 1; }

guests: $(SETUP) check-binutils check-cc
	$(PY) -m emu.userspace.guests build

# The compiled hardware MMU (emu/hw/mmu.c, emu/hw/native.py): built with the same compiler; where it
# cannot be, runs use the Python walkers and say so in one line.
native: $(SETUP) check-cc
	$(PY) -m emu.hw.native build

run-guest: guests native
	$(PY) -m emu run $(GUEST) $(RUNARGS)

# The suite on the compiled MMU, then the hardware tests once more on the Python walkers.
test: guests native
	$(PY) -m pytest
	EMU_PURE_PYTHON=1 $(PY) -m pytest -q tests/hw

bench: guests native
	$(PY) -m bench

# The docs extra of pyproject.toml (quoted for the shell): mkdocs, and nothing of the project itself,
# so `make docs` needs no guest build and installs in seconds.  (No --quiet on the build: it hides the
# warnings --strict counts.)
DOCS_REQS := $(shell sed -n 's/^docs *= *\[\(.*\)\].*/\1/p' pyproject.toml | tr '",' "' ")

docs: | $(filter $(VENV)/bin/python,$(PY))
	@$(PY) -c 'import mkdocs' 2>/dev/null || $(PY) -m pip install --quiet $(DOCS_REQS)
	$(PY) tools/check_links.py
	$(PY) -m mkdocs build --strict

# The lint extra of pyproject.toml, installed the same way as the docs' (nothing of the project itself).
LINT_REQS := $(shell sed -n 's/^lint *= *\[\(.*\)\].*/\1/p' pyproject.toml | tr '",' "' ")

lint: | $(filter $(VENV)/bin/python,$(PY))
	@$(PY) -c 'import ruff, mypy' 2>/dev/null || $(PY) -m pip install --quiet $(LINT_REQS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf build .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
