# Two commands do all the set-up on a fresh machine:
#   make demo   -- venv + requirements + FashionMNIST, then the embedded end-to-end demo
#   make test   -- venv + requirements + FashionMNIST, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
MODEL_DIR ?= models

.PHONY: demo test setup data bench clean-demo lint fetch-weights

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

data: setup
	$(PY) -m source.data.fashion_mnist_setup --data-dir $(DATA_DIR)

demo: data
	$(PY) demo.py --data-dir $(DATA_DIR)

test: data
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_pretrain_throughput.py
	$(PY) bench/bench_upper_step.py
	$(PY) -m pip install -q -r requirements-dev.txt  # lightly, for the comparison below
	$(PY) bench/bench_augment.py

# Dev tools (ruff; lightly for bench/bench_augment.py) live in requirements-dev.txt, not the runtime set.
lint: setup
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m ruff check .

# The paper's published weights (Google Drive, via the optional gdown) into $(MODEL_DIR), verified;
# prints the bissl.py / fine-tuning.py commands that use them.
fetch-weights: setup
	$(PY) -m pip install -q $$(grep -o '^gdown[^ ]*' requirements-dev.txt)
	$(PY) -m source.tools.weights fetch --model-dir $(MODEL_DIR)
