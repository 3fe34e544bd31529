# `make test` and `make demo` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On a GPU machine keep its own (CUDA) torch; elsewhere pin the CPU build, which pip takes from
# local disk (an unpinned `torch` would pull a multi-GB CUDA build).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
VENV_FLAGS := --system-site-packages
TORCH_REQ :=
else
VENV_FLAGS :=
TORCH_REQ := torch==2.13.0
endif

.PHONY: install test lint demo clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_REQ),$(PY) -m pip install -q $(TORCH_REQ))
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check megatron_sgtm tests tools
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check megatron_sgtm tests tools

demo: $(STAMP)
	$(VENV)/bin/megatron-sgtm demo --out runs/demo

clean:
	rm -rf $(VENV) *.egg-info
