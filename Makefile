# flashstep: the two commands a fresh machine needs are `make serve` and `make test`.
# Both create .venv when missing and install the project into it. The CPU torch wheel is
# installed first unless a torch is already importable in the venv (a CUDA build you put there
# yourself is kept): a bare `pip install torch` would pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.flashstep-installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_CPU)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/flashstep serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q

# The fast lane: everything but the tests marked slow (real training legs, subprocess servers).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(VENV)/bin/flashstep bench cpu

clean-venv:
	rm -rf $(VENV)
