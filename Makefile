# The two commands a new user runs. Each one creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

$(VENV)/.run: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[serve]'
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e '.[test]'
	touch $@ $(VENV)/.run

demo: $(VENV)/.run
	$(VENV)/bin/plainsd demo

test: $(VENV)/.test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
