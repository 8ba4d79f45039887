# Two commands do all the set-up: `make demo` and `make test`.
# TORCH pins the PyTorch build. The default is the CPU wheel; a GPU user picks their own, e.g.
#   make test TORCH="torch==2.13.0"            (whatever build your pip index serves)
#   make demo TORCH=skip                       (keep the torch already installed in .venv)
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-peers lint docs docs-serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if [ "$(TORCH)" != "skip" ]; then $(PY) -m pip install --quiet "$(TORCH)"; fi
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m torchkeel demo

# Tests marked serial (tests/distributed/ whole, and every test that starts ranks: `distributed`,
# the benchmarks among them) run one at a time, in a pytest of their own: two gloo jobs at once on 2
# cores only slow each other down, and much of their time goes to waiting for processes. Beside it,
# JOBS xdist workers take the rest (in-process tests, and slow ones that start one process: kill -9,
# signals, the demo); the serial part's report follows theirs (its output is kept in SERIAL_LOG
# meanwhile). `make test` fails if either part did. JOBS=1: the rest in this process.
# test-fast runs the tests not marked slow on the JOBS workers.
JOBS ?= 2
XDIST = $(if $(filter-out 1,$(JOBS)),-n $(JOBS))
SERIAL_LOG := .test-serial.log

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m serial > $(SERIAL_LOG) 2>&1 & serial_pid=$$!; \
	$(PY) -m pytest -q --durations=15 $(XDIST) -m "not serial"; parallel=$$?; \
	wait $$serial_pid; serial=$$?; \
	echo "---- the serial part (tests that start ranks), run beside the above:"; cat $(SERIAL_LOG); \
	[ $$parallel -eq 0 ] && [ $$serial -eq 0 ]

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# The peers measured beside us (not part of `make test`): .venv-peers holds the same torch as .venv,
# torchkeel with its own dependencies (-e .), and these pinned releases; the torch already there is
# pinned again so that no peer can move it.
PEERS_VENV  := .venv-peers
PEERS_PY    := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS       := pytorch-lightning==2.6.6 accelerate==1.15.0 pytorch-ignite==0.5.5

$(PEERS_STAMP): pyproject.toml Makefile
	test -x $(PEERS_PY) || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet --upgrade pip
	if [ "$(TORCH)" != "skip" ]; then $(PEERS_PY) -m pip install --quiet "$(TORCH)"; fi
	$(PEERS_PY) -m pip install --quiet $(PEERS) -e . \
		"torch==$$($(PEERS_PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/peers.py

lint: $(STAMP)
	$(PY) -m mypy
	$(PY) -m ruff check src tests benchmarks

# The site (docs/, mkdocs.yml): MkDocs Material + mkdocstrings. --strict: a broken link, anchor or API
# reference fails the build. The docs packages come with the dev extra (and the docs extra).
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site
	$(PY) tests/tools/docs_blocks.py

docs-serve: $(STAMP)
	$(PY) -m mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
