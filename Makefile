# `make run`: set up .venv if needed and run the main job on the embedded default model.
# `make test`: set up .venv if needed, check the import layers (lint-imports) and run the test suite (a few minutes).
# `make eval`: the shipped `toyworld` model's full evaluation (96 held-out items per figure); fails below a target.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= draw a red circle and play a high beep and show a green square moving left

.PHONY: run test eval lint bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/anygpt generate "$(PROMPT)" --out outputs

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

eval: $(STAMP)
	$(VENV)/bin/anygpt toyworld eval toyworld --samples 96 --jobs 2

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

clean-venv:
	rm -rf $(VENV)
