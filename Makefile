# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint benchmark clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing vadflow into $(VENV) (a few minutes the first time; log in $(VENV)/install.log)"
	@$(PY) -m pip install -e '.[dev]' > $(VENV)/install.log 2>&1 \
		|| { tail -n 40 $(VENV)/install.log; echo "install failed: see $(VENV)/install.log"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

# `make demo DEMO_ARGS="--domain industrial"` for the industrial line.
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/vadflow demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

test-fast: lint
	$(PY) -m pytest -m "not slow"

benchmark: install
	$(PY) benchmarks/tiling.py --size 25000
	$(PY) benchmarks/detectors.py --quick
	$(PY) benchmarks/contracts.py

clean:
	rm -rf .vadflow .pytest-state
