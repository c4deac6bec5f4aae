# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch goes in first, pinned to the local CPU wheel; otherwise pip would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[dev]"
	# lmms-eval's own requirements would replace torch with a CUDA build; what it needs is in the eval extra.
	$(PIP) install -q --no-deps "lmms_eval==0.7.3"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/pmod demo --out demo-output

bench: setup
	$(PY) benchmarks/prefill.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/efficiency.py
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
