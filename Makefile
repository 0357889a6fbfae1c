# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: a local CPU wheel exists; any other version pulls GBs of CUDA packages.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

demo: $(STAMP)
	bash bench/demo.sh

bench: $(STAMP)
	$(PY) bench/store_bench.py
	$(PY) bench/merge_bench.py

clean:
	rm -rf $(VENV) build dist *.egg-info
