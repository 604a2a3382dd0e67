# mpt-train developer targets. Every target creates (once) and reuses ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SPEC ?= yamls/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: venv test test-fast quickstart lint format docs clean

venv: $(STAMP)

# Re-installs only when pyproject.toml changes: a second call installs nothing.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(PY) -m mpt_train.tools.quickstart $(SPEC)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) scripts/lint_dockerfile.py Dockerfile

# The run-spec reference and the benchmark tables in README.md and docs/, from their sources.
docs: $(STAMP)
	$(PY) scripts/docs.py

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache
