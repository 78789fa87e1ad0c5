# Every target creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs serve clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run: make PYTHON=/path/to/python3.11 ..." >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moa-stream demo

test: $(STAMP)
	$(BIN)/ruff check moa_stream tests benchmarks
	$(BIN)/ruff format --check moa_stream tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

serve: $(STAMP)
	$(BIN)/moa-stream serve

bench: $(STAMP)
	$(BIN)/moa-stream bench --out docs/benchmarks

docs: $(STAMP)
	$(BIN)/python benchmarks/make_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
