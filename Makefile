# The two commands a new user types: `make run-guest` and `make test`.
# Each sets itself up on first use (.venv, packages, guest builds).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
GUEST  ?= hello
RUNARGS ?= --trace

.PHONY: run-guest test guests bench clean check-binutils check-cc venv

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "error: Python >= 3.10 is needed (found: $$($(PYTHON) --version 2>&1))"; exit 1; }
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || \
	  { echo "error: the Python venv module is missing: install it (Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
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

guests: $(STAMP) check-binutils check-cc
	$(PY) -m emu.userspace.guests build

run-guest: guests
	$(PY) -m emu run $(GUEST) $(RUNARGS)

test: guests
	$(PY) -m pytest

bench: guests
	$(PY) -m bench

clean:
	rm -rf build .pytest_cache .hypothesis
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
