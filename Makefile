# peftcli — `make demo` and `make test` work on a fresh machine, offline: they run `setup` first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first and pinned, so the rest of the stack never pulls a different (CUDA) build.
# On a GPU machine: make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.peftcli-installed
TINY := models/tiny
# The demo's base: a small model pre-trained on general text by peftcli itself, once (then cached).
DEMO_BASE := runs/demo-base/model
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast test-gpu gpu-check lint bench clean help

help:
	@echo "make setup     create $(VENV), install torch ($(TORCH)) then peftcli[dev,bench,gguf]"
	@echo "make demo      pre-train a tiny base (once), teach it a skill with LoRA, compare with full fine-tuning (offline, ~2 min on 2 idle CPU cores)"
	@echo "make test      the full CPU test suite (offline, < 10 min)"
	@echo "make test-gpu  tests marked gpu (needs CUDA)"
	@echo "make gpu-check test-gpu + the llama-1b/llama-8b benches on a GPU machine (scripts/gpu_check.sh)"
	@echo "make lint      ruff (check + format), import-linter (layering), mypy"
	@echo "make test-fast the fast lane: pytest -m 'not slow and not gpu' (< 60 s)"
	@echo "make bench     peftcli vs the plain TRL script on CPU (see README: Performance)"
	@echo "make clean     remove runs, models and the virtual environment"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	@echo "installing peftcli[dev,bench,gguf]: the gguf extra compiles llama.cpp the first time (several minutes)"
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF" $(BIN)/python -m pip install -q -e ".[dev,bench,gguf]"
	@touch $(STAMP)

# Always reinstall on an explicit `make setup` (e.g. with another TORCH=...).
setup:
	@rm -f $(STAMP)
	@$(MAKE) --no-print-directory $(STAMP)

$(TINY)/config.json: $(STAMP) scripts/make_tiny_model.py
	$(BIN)/python scripts/make_tiny_model.py $(TINY)

$(DEMO_BASE)/config.json: $(STAMP) scripts/make_tiny_model.py recipes/demo-base.yaml recipes/data/general/corpus.txt
	$(BIN)/python scripts/make_tiny_model.py models/demo-init --demo
	$(BIN)/peftcli train recipes/demo-base.yaml --overwrite

demo: $(STAMP) $(DEMO_BASE)/config.json
	$(BIN)/peftcli train recipes/demo.yaml --overwrite
	$(BIN)/peftcli eval runs/demo --generate
	$(BIN)/peftcli compare recipes/demo.yaml --methods lora,full --out runs/demo-compare --overwrite
	@echo
	@$(BIN)/python scripts/demo_figures.py
	@echo
	@echo "Demo done. Report: runs/demo/report.md (eval: runs/demo/eval.md)   LoRA vs full: runs/demo-compare/compare.md"
	@echo "Next: peftcli generate --adapter demo=runs/demo --prompt 'What follows May?';  peftcli merge runs/demo --out merged/demo;  peftcli serve --adapter demo=runs/demo"

test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

# The fast lane: everything but the training-heavy (slow) and GPU tests, in under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

gpu-check:
	bash scripts/gpu_check.sh

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --config cpu --ablate

lint: $(STAMP)
	$(BIN)/ruff check peftcli tests scripts
	$(BIN)/ruff format --check peftcli tests scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

clean:
	rm -rf runs merged models $(VENV) .pytest_cache
