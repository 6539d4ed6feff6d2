# The README's two commands: `make demo` and `make test`. Each first builds a
# local virtual environment (.venv) with pinned versions (constraints.txt).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench reliability proto clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/monim demo

# Triton for the tests only: its interpreter runs the GPU search kernels (datastore/gpu_select.py)
# on CPU (tests/unit/test_gpu_kernels_interpreted.py); the demo does not need it.
TEST_STAMP := $(VENV)/.test-installed
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt triton
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m bench.search_bench

# The long reliability profile (issue 15): load, faults, and a check of every answer and of the final
# state; its tables go to docs/RELIABILITY.md. `make reliability MINUTES=N` for another length.
MINUTES ?= 10
reliability: $(STAMP)
	$(PY) -m reliability.run --minutes $(MINUTES) --report docs/RELIABILITY.md

proto: $(STAMP)
	PATH=$(VENV)/bin:$$PATH bash protos/generate.sh

clean:
	rm -rf $(VENV) *.egg-info
