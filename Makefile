# Two commands do all the set-up: `make demo` and `make test`.
# TORCH pins the PyTorch build. The default is the CPU wheel; a GPU user picks their own, e.g.
#   make test TORCH="torch==2.13.0"            (whatever build your pip index serves)
#   make demo TORCH=skip                       (keep the torch already installed in .venv)
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ "$(TORCH)" != "skip" ]; then $(PY) -m pip install --quiet "$(TORCH)"; fi
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m torchkeel demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

lint: $(STAMP)
	$(PY) -m mypy
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info
