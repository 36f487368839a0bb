# `make run`: set up .venv if needed and run the main job on the embedded default model.
# `make test`: set up .venv if needed, check the import layers (lint-imports) and run the test suite (a few minutes).
# `make eval`: the shipped `toyworld` model's full evaluation (96 held-out items per figure); fails below a target.
# `make test-lmms`: set up .venv-lmms if needed (lmms-eval 0.7.3 with the project; it cannot join .venv) and run the
#   lmms-eval tests there (`--model anygpt`, and lmms-eval's OpenAI-compatible model against `anygpt serve`); fails if
#   any of them skips. docs/evaluation.md.
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

# lmms-eval 0.7.3 pins av<16 and protobuf<7 (the project's .venv has av 18 and ray[serve]'s protobuf 7): its own venv,
# pinned by constraints-lmms.txt (the versions of constraints.txt but for av and protobuf). No dev extra: only pytest.
LMMS_VENV := .venv-lmms
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_STAMP := $(LMMS_VENV)/.installed

.PHONY: test-lmms clean-venv-lmms

$(LMMS_STAMP): pyproject.toml constraints-lmms.txt
	test -x $(LMMS_PY) || $(PYTHON) -m venv $(LMMS_VENV)
	echo '*' > $(LMMS_VENV)/.gitignore
	$(LMMS_PY) -m pip install --quiet --upgrade "pip>=24"
	$(LMMS_PY) -m pip install --quiet -c constraints-lmms.txt -e . "lmms-eval==0.7.3" pytest
	touch $(LMMS_STAMP)

# The lmms-eval tests must run here, not skip: pytest's JUnit report is read back and any skip (or no test) fails.
test-lmms: $(LMMS_STAMP)
	$(LMMS_PY) -m pytest -q -rs -p no:cacheprovider --junitxml=$(LMMS_VENV)/junit.xml \
		tests/test_eval.py tests/test_lmms_server.py -k lmms
	$(LMMS_PY) -c 'import sys, xml.etree.ElementTree as E; r = E.parse(sys.argv[1]).getroot(); \
		skips = [e.get("message", "") for e in r.iter("skipped")]; n = len(list(r.iter("testcase"))); \
		bad = [m for m in skips if "nextgpt-samples" not in m]; \
		print(f"test-lmms: {n} run, {len(skips)} skipped ({len(skips) - len(bad)} for absent NExT-GPT samples)"); \
		sys.exit(1 if bad or not n else 0)' $(LMMS_VENV)/junit.xml

clean-venv-lmms:
	rm -rf $(LMMS_VENV)
