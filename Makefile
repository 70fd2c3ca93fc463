# One command sets up and runs the demo; one sets up and runs the tests (see README.md).
PY_SYS ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# pip's cap on this kind of machine picks the torch/torchvision pair that lies on local disk.
export HF_HUB_OFFLINE := 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: setup test test-fast demo clean

$(VENV)/.installed: pyproject.toml
	$(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,eval]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q --durations=20 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

demo: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tools/run_demo.sh

clean:
	rm -rf runs data/demo
