# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed

# Every install goes through the lock: exact versions with hashes of the runtime deps and the
# dev extras, torch being the local 2.13.0 CPU wheel (any other torch pulls GBs of CUDA packages).
LOCK   := requirements-dev.lock
TORCH  := torch==2.13.0
UV     := uv==0.13.9
LOCKVENV := .venv-lock

.PHONY: demo test bench lint lock clean

$(PY):
	python3 -m venv $(VENV)

# setup.py builds the codec's C kernel (storage/_planes.c) in place: edits to it reinstall.
$(STAMP): $(LOCK) pyproject.toml setup.py storage/_planes.c | $(PY)
	$(PIP) install -q --disable-pip-version-check --require-hashes -r $(LOCK)
	$(PIP) install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Refresh the lock from pyproject.toml: `make lock` keeps every pin that still fits and only
# adds/drops what pyproject.toml changed; `make lock UPGRADE=1` moves everything to the newest
# release (torch stays 2.13.0). uv resolves (it does not read pip's config, hence find-links);
# plain pip installs what it writes.
$(LOCKVENV)/bin/uv:
	python3 -m venv $(LOCKVENV)
	$(LOCKVENV)/bin/pip install -q --disable-pip-version-check $(UV)

lock: | $(LOCKVENV)/bin/uv
	echo "$(TORCH)" > $(LOCKVENV)/torch.txt
	UV_CUSTOM_COMPILE_COMMAND="make lock" $(LOCKVENV)/bin/uv pip compile -q pyproject.toml \
	  --extra dev --generate-hashes --python-version 3.11 -c $(LOCKVENV)/torch.txt \
	  --find-links /opt/wheels --emit-find-links $(if $(UPGRADE),--upgrade) -o $(LOCK)

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
	rm -rf $(VENV) $(LOCKVENV) build dist *.egg-info storage/*.so
