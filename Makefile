# Two commands do everything: `make demo` and `make test` (both set up .venv first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# First Python >= 3.12 found: python3.12 on PATH, else pyenv's 3.12.x.
PYTHON312 := $(shell bash scripts/find_python312.sh)

.PHONY: setup test lint demo bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: need Python >= 3.12 (python3.12 on PATH or pyenv 3.12.x); megatron-core 0.19 requires it" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,launch]'
	@touch $@

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check erpd_megatron checkpoints_conv launchers tests

demo: setup
	$(VENV)/bin/erpd demo

bench: setup
	$(PY) -m erpd_megatron.bench.run_all

clean:
	rm -rf $(VENV) runs build *.egg-info
