# mpt-train developer targets. Every target creates (once) and reuses the stack's environment:
#   STACK=pinned  (default) ./.venv          pip install -e '.[dev]': exactly Composer's
#                                            declared set (torch 2.7.0), pip check clean
#   STACK=current           ./.venv-current  stacks/current.txt, locked by uv with
#                                            stacks/current-overrides.txt (torch 2.11.0)
# e.g. `make venv STACK=current && make test-fast STACK=current`. See docs/development.md.
PYTHON ?= python3
STACK ?= pinned
SPEC ?= yamls/quickstart.yaml
PYTEST_ARGS ?=
# The resolver that writes and installs the lock files, from PyPI at a fixed version.
UV_VERSION := 0.13.8
UV_DIR := .uv
UV := $(UV_DIR)/bin/uv
LOCK_ARGS := pyproject.toml --extra dev --universal --python-version 3.10 --quiet

ifeq ($(STACK),pinned)
VENV := .venv
else ifeq ($(STACK),current)
VENV := .venv-current
else
$(error STACK must be pinned or current, got '$(STACK)')
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast quickstart lint lock stack format docs clean

venv: $(STAMP)

$(UV):
	test -x $(UV_DIR)/bin/python || $(PYTHON) -m venv $(UV_DIR)
	$(UV_DIR)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Re-installs only when pyproject.toml (or the stack's lock) changes: a second call installs
# nothing.
.venv/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The lock is the whole resolution (overrides applied), so nothing else is resolved here.
.venv-current/.installed: pyproject.toml stacks/current.txt | $(UV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(UV) pip install --quiet --python $(PY) --no-deps -r stacks/current.txt -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

quickstart: $(STAMP)
	$(PY) -m mpt_train.tools.quickstart $(SPEC)

# Which named stack the environment holds (installed versions against the lock files).
stack: $(STAMP)
	$(PY) -m mpt_train.compat --stack

lint: $(STAMP) | $(UV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) scripts/lint_dockerfile.py Dockerfile
	$(PY) scripts/check_locks.py --uv $(UV)

# Re-resolve both lock files after a change to pyproject.toml or the overrides; versions
# already locked are kept where they still fit.
lock: | $(UV)
	$(UV) pip compile $(LOCK_ARGS) -o stacks/pinned.txt
	$(UV) pip compile $(LOCK_ARGS) --overrides stacks/current-overrides.txt -o stacks/current.txt

# The run-spec reference and the benchmark tables in README.md and docs/, from their sources.
docs: $(STAMP)
	$(PY) scripts/docs.py

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf .venv .venv-current $(UV_DIR) runs .pytest_cache
