# Two commands do everything: `make demo` and `make test` (both set up .venv first).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# First Python >= 3.12 found: python3.12 on PATH, else pyenv's 3.12.x.
PYTHON312 := $(shell bash scripts/find_python312.sh)

.PHONY: setup sandbox-deps sglang-env test lint demo bench clean
setup: $(VENV)/.installed sandbox-deps

# Code rewards run model-written programs in bubblewrap with Debian's /usr/bin/python3 (docs/code_tasks.md).
# Installed here when missing and we are root with apt; otherwise a warning (code rewards then refuse to run).
sandbox-deps:
	@if ! command -v bwrap >/dev/null || [ ! -x /usr/bin/python3 ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap python3 >/dev/null; \
	  else echo "warning: bubblewrap or /usr/bin/python3 missing: code rewards will refuse to run (apt-get install bubblewrap python3)" >&2; fi; \
	fi

# sglang 0.5.23 on CPU in its own environment, for the real-server tests (pins: scripts/sglang_cpu/requirements.txt;
# cached by a stamp keyed on them, so this is a no-op once built). Location: $(SGLANG_VENV), read by the tests.
SGLANG_VENV := .venv-sglang
sglang-env:
	@bash scripts/sglang_cpu/build_env.sh $(SGLANG_VENV)

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: need Python >= 3.12 (python3.12 on PATH or pyenv 3.12.x); megatron-core 0.19 requires it" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,launch]'
	@touch $@

test: setup sglang-env
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check erpd_megatron checkpoints_conv launchers tests

demo: setup
	$(VENV)/bin/erpd demo

bench: setup sglang-env
	$(PY) -m erpd_megatron.bench.run_all

clean:
	rm -rf $(VENV) $(SGLANG_VENV) runs build *.egg-info
