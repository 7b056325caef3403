# Set-up and the two commands the README documents: `make demo` (the offline quickstart) and `make test`.
# Each creates .venv on first use, installing torch==2.13.0 (CPU) first, then logix.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/logix run configs/quickstart.yaml --project quickstart --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/ruff check logix logix_console tests examples benchmarks
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check logix logix_console tests examples benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_capture.py

clean:
	rm -rf $(VENV) logix_runs .pytest_cache
