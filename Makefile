# The interface: `make demo` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
DATA   := data/stdlib
# The demo's two data-parallel processes on CPU; one thread each keeps them off each other's core.
NPROC  ?= 2

.PHONY: install demo data test test-fast test-gpu check lint format docs bench clean slurm-up slurm-down

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

test: install check lint
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# Static checks of the package code: ruff's lint rules and mypy (config in pyproject.toml).
check: install
	$(BIN)/ruff check pretrain launch data_pipeline
	$(BIN)/mypy

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: install
	$(BIN)/python -m pretrain.config > docs/config.md

# Every benchmark, figures written into docs/benchmarks.md (benchmarks/suite.py). The char-level
# parity config reads a bytes-tokenized build of the same corpus.
bench: install data
	$(BIN)/pretrain-data build --stdlib --out data/stdlib_bytes --tokenizer bytes --val-fraction 0.05
	$(BIN)/python benchmarks/suite.py

# Users' single-GPU CI lane: the gpu-marked tests, then every family's tiny config trained in bf16
# on one GPU. Without CUDA it says so and exits 0 (nothing to run there).
test-gpu: install data
	@if ! $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "make test-gpu: no CUDA device here; the gpu-marked tests and bf16 runs need one"; \
	else \
		$(BIN)/pytest -q -m gpu && \
		for c in configs/tiny*.yaml; do \
			$(BIN)/pretrain-train $$c run.device=cuda run.precision=bf16 parallel.zero_stage=1 \
				run.train_steps=20 run.output_dir=runs/test-gpu run.resume=never \
				tracking.enabled=false || exit 1; \
		done; \
	fi

# A real single-node Slurm for trying `pretrain-launch --slurm` (root; installs the Debian packages).
# `make test` needs neither: tests/slurm starts and stops the cluster itself, or skips.
slurm-up:
	scripts/slurm_cluster.sh start

slurm-down:
	scripts/slurm_cluster.sh stop

clean:
	rm -rf runs data build *.egg-info
