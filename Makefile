# Set-up and tests on a fresh machine (Python 3.11). `make test` is what CI runs.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install test clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,hf]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
