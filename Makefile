# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Each installs what it needs (Debian packages, a venv, pip packages) and is quick when done.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORPUS := /usr/share/debian-reference/debian-reference.ja.txt.gz
APT_STAMP := $(VENV)/.apt
RUN    ?= runs/demo

# llama.cpp must be built portable: a native (-march=native) build segfaults on chat
# completions on these machines (DESIGN.md). pip caches the built wheel.
export CMAKE_ARGS := -DGGML_NATIVE=OFF
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast bench eval clean

setup: $(STAMP) $(APT_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q -e '.[cpu,test]'
	touch $(STAMP)

# Debian packages: the bilingual corpus of the embedded default, and Chromium for the
# report's screenshot test.
$(APT_STAMP): | $(STAMP)
	@if [ ! -f $(CORPUS) ] || ! command -v chromium >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    debian-reference-en debian-reference-ja chromium >/dev/null; fi
	touch $(APT_STAMP)

demo: setup
	$(BIN)/autointerp demo $(RUN)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python evals/bench.py

eval: setup
	$(BIN)/python evals/eval_granularity.py

clean:
	rm -rf $(VENV) runs build *.egg-info
