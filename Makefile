# Every target creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-ui lint bench docs serve clean

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
	$(BIN)/pytest -m "not ui"

# The playground page in headless Chromium: needs Debian's chromium and chromium-driver
# (apt-get install chromium chromium-driver); without them the tests are skipped with the reason.
# Screenshots go to build/ui/.
test-ui: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[ui]'
	$(BIN)/pytest -m ui tests/ui

serve: $(STAMP)
	$(BIN)/moa-stream serve

bench: $(STAMP)
	$(BIN)/moa-stream bench --out docs/benchmarks

docs: $(STAMP)
	$(BIN)/python benchmarks/make_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
