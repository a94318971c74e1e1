# dis_dist: `make demo` trains the embedded Fashion-MNIST demo, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
APT_PACKAGES ?= dataset-fashion-mnist shellcheck
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# Compiled kernels (torch.compile) are cached here, so only the first run pays for compiling.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
# DeepSpeed's JIT-built ops (about a minute to build once).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# Reference statistics of evaluations (tools/fid.py, eval.*), computed once per reference.
export DIS_DIST_CACHE ?= $(CURDIR)/.cache/dis_dist

.PHONY: venv venv-dev demo test test-fast lint clean apt

venv: $(STAMP)
venv-dev: $(DEV_STAMP)

# torch is pinned in the same pip call as everything else, so no dependency can pull another
# (multi-GB CUDA) build.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory apt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet "$(TORCH)" -e .
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $@

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get install -y -qq $$missing >/dev/null || (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null); \
	  else \
	    echo "missing Debian packages:$$missing -- run: sudo apt-get install$$missing"; \
	  fi; \
	fi

DEMO_CACHE ?= runs/data/fmnist-pixels28

# The whole pipeline: Fashion-MNIST -> encode (pixel space) -> shards -> train -> evaluate. A
# rerun skips the finished shards and the trained classifier, and resumes training from the
# newest checkpoint.
demo: venv
	$(BIN)/python -m dis_dist.data.encode --input /usr/share/datasets/fashion-mnist \
	  --output $(DEMO_CACHE) --vae pixels --resolution 28 --shard-size 2500 --no-flip
	$(BIN)/python tools/train_fmnist_classifier.py --out .cache/fmnist_classifier.pt
	$(BIN)/python -m dis_dist.train --config configs/demo_fmnist.yaml data.url=$(DEMO_CACHE)

test: venv-dev
	$(BIN)/python -m pytest -q --durations=15

test-fast: venv-dev
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv-dev
	$(BIN)/ruff check dis_dist tests tools

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
