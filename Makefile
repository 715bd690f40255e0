# Two commands for a fresh machine with Python 3.11:
#   make demo   -> set up .venv and run a short MT10 training run on the default settings
#   make test   -> set up .venv and run the test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# CPU-only machines get the CPU build of torch before the project, so pip never pulls a
# multi-GB CUDA build. Machines with an NVIDIA driver let pip pick torch from the range in
# pyproject.toml. Override with `make TORCH_SPEC=... setup`.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)")
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	touch $@

demo: setup
	# A fresh short run each time (the demo's run dir is replaced).
	rm -rf runs/mt10-demo
	$(BIN)/mtrl train --config configs/mt10_demo.json

test: setup
	# Exit code 5 ("no tests collected") is not a failure of the suite; any other is.
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ] || exit $$rc
	$(BIN)/ruff check mtrl tests scripts

lint: setup
	$(BIN)/ruff check mtrl tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
