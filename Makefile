# Two commands: `make demo` and `make test`. Both create .venv on a fresh machine first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_output

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" setuptools wheel
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/relevance demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/generate_world.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
