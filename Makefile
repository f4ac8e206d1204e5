# Set-up and tests on a fresh machine (Python 3.11). `make test` is what CI runs.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,hf]'
	touch $@

install: $(STAMP)

# The main job: the embedded default (configs/default.py), a tiny T5 trained
# from scratch on the synthetic instruction mixture (a few minutes on a CPU).
demo: $(STAMP)
	$(VENV)/bin/ift-jax train --workdir=workdirs/default

# Two worker processes, each taking whole files (module fixtures are built once).
test: $(STAMP)
	$(VENV)/bin/python -m pytest tests -q -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
