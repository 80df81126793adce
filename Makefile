# Two commands do all the set-up on a fresh machine:
#   make demo   -- venv + requirements + the package (editable) + FashionMNIST, then the embedded end-to-end demo
#   make test   -- the same set-up, then the test suite without the long fault-injection runs (what CI runs)
#   make test-all -- everything, the long runs too (about 25 minutes, estimated)
# and, day to day:
#   make test-fast          -- the tests that take under ~5 s each and start no process (under a minute)
#   make bench [QUICK=1]    -- every benchmark in bench/ (QUICK=1: tiny sizes, checks that they run)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
MODEL_DIR ?= models
QUICK ?=

.PHONY: demo test test-all test-fast setup data bench clean-demo lint fetch-weights

# The package is installed editable (pip install -e .), so bench/, experiments/ and tools import
# `source` and `config_default` from anywhere. --no-build-isolation builds it with the venv's own
# setuptools, so the install needs no network once the requirements are in.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -q "setuptools>=70.1"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

# The four raw FashionMNIST files; the set-up script runs only when one is missing (it imports
# torch, seconds that `make test-fast` need not spend every time).
FASHION_MNIST := $(addprefix $(DATA_DIR)/FashionMNIST/raw/,train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

data: setup $(FASHION_MNIST)

$(FASHION_MNIST) &: | setup
	$(PY) -m source.data.fashion_mnist_setup --data-dir $(DATA_DIR)

demo: data
	$(PY) demo.py --data-dir $(DATA_DIR)

# Two pytest workers (pytest-xdist), one test file each at a time (module fixtures are built once):
# most tests start torch in subprocesses, whose imports alone take seconds of one core.
test: data
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not long" tests

# Everything, including the long fault-injection runs (launcher killed, SIGTERM/SIGINT/SIGUSR1) and the
# benchmarks' smoke runs: about 25 minutes on 2 idle cores (estimated from the parts).
test-all: data
	$(PY) -m pytest -q tests

test-fast: data
	$(PY) -m pytest -q -m "not slow and not multiprocess and not gpu" tests

# Each benchmark prints its ratio and writes its figures to bench/results/<name>.json
# (bench/results/quick/ with QUICK=1). lightly (requirements-dev.txt) is bench_augment.py's reference.
BENCHMARKS := $(sort $(wildcard bench/bench_*.py))
bench: data
	$(PY) -m pip install -q -r requirements-dev.txt
	set -e; for script in $(BENCHMARKS); do echo "== $$script"; $(PY) $$script $(if $(QUICK),--quick); done

# Dev tools (ruff; lightly for bench/bench_augment.py) live in requirements-dev.txt, not the runtime set.
lint: setup
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m ruff check .

# The paper's published weights (Google Drive, via the optional gdown) into $(MODEL_DIR), verified;
# prints the bissl.py / fine-tuning.py commands that use them.
fetch-weights: setup
	$(PY) -m pip install -q $$(grep -o '^gdown[^ ]*' requirements-dev.txt)
	$(PY) -m source.tools.weights fetch --model-dir $(MODEL_DIR)
