# The interface: `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
DATA   := data/stdlib
# The demo's two data-parallel processes on CPU; one thread each keeps them off each other's core.
NPROC  ?= 2

.PHONY: install demo data test test-fast lint format docs bench clean slurm-up slurm-down

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed installs as pure Python, no op is compiled.
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Always asks the builder: it returns in seconds when the dataset is current, and rebuilds one
# written by an older builder or from other settings.
data: install
	$(BIN)/pretrain-data build --stdlib --out $(DATA) --vocab-size 4096 --val-fraction 0.05

demo: install data
	$(BIN)/pretrain-launch configs/demo.yaml --nproc-per-node $(NPROC)

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: install
	$(BIN)/python -m pretrain.config > docs/config.md

bench: install data
	$(BIN)/python benchmarks/throughput.py

# A real single-node Slurm for trying `pretrain-launch --slurm` (root; installs the Debian packages).
# `make test` needs neither: tests/slurm starts and stops the cluster itself, or skips.
slurm-up:
	scripts/slurm_cluster.sh start

slurm-down:
	scripts/slurm_cluster.sh stop

clean:
	rm -rf runs data build *.egg-info
